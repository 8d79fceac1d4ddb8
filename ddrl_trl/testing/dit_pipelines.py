"""Tiny image DiT pipelines with language-model text encoders (Qwen-Image, Z-Image, SANA), randomly initialised from
config, fully offline.

Each mirrors the component layout of diffusers' own tests for that pipeline (tests/pipelines/qwenimage, z_image,
sana), with the offline tokenizers of `llm_tokenizers` and the family's real scheduler configuration. All sample
32x32 images from 8x8 latents; call the pipelines with ``max_sequence_length=16``.
"""

from __future__ import annotations

import inspect
import re

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Gemma2Config,
    Gemma2Model,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3Model,
)

from .components import DEFAULT_WORDS, TINY_VAE_BLOCKS, DecoderSize, tiny_pipeline
from .flow_pipelines import FLUX_SCHEDULER_CONFIG
from .llm_tokenizers import build_gemma_tokenizer, build_qwen_tokenizer

#: scheduler_config.json of Qwen/Qwen-Image: FLUX.1-dev's dynamic shifting, but exponential, up to 0.9 at 8192 tokens,
#: ending at 0.02.
QWEN_IMAGE_SCHEDULER_CONFIG = dict(
    FLUX_SCHEDULER_CONFIG,
    num_train_timesteps=1000,
    shift=1.0,
    max_shift=0.9,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
#: Z-Image's Qwen3 text encoder: 2 layers (the pipeline reads hidden_states[-2]) of hidden 32, 4 heads of 8.
ZIMAGE_QWEN3 = DecoderSize(hidden=32, layers=2, heads=4, kv_heads=2, max_positions=64, head_dim=8)
#: SANA's Gemma-2 text encoder: 1 layer of hidden 16, 2 heads of 8, one KV head.
SANA_GEMMA2 = DecoderSize(hidden=16, layers=1, heads=2, kv_heads=1, max_positions=1024, head_dim=8)


def tiny_qwen2_5_vl(
    vocab_size: int, tokenizer, hidden: int = 32, layers: int = 2
) -> Qwen2_5_VLForConditionalGeneration:
    """A `layers`-layer Qwen2.5-VL text encoder (2 heads of `hidden / 2`, one KV head, multimodal RoPE) with a
    1-block vision tower (unused by text-to-image prompts), in eval mode."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|image_pad|>", "<|video_pad|>")}
    ids.update({t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")})
    head_dim = hidden // 2
    config = Qwen2_5_VLConfig(
        text_config={
            **DecoderSize(hidden, layers, heads=2, kv_heads=1, max_positions=256).config_fields(vocab_size),
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 2 - head_dim // 4 - head_dim // 8],
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
            "window_size": 28,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen3_config(vocab_size: int, size: DecoderSize, **extra) -> Qwen3Config:
    """A Qwen3 config of ``size`` with tied embeddings, for the Qwen3 text encoders of Z-Image and FLUX.2 [klein];
    ``extra`` adds config fields."""
    return Qwen3Config(**size.config_fields(vocab_size), rms_norm_eps=1e-6, tie_word_embeddings=True, **extra)


def tiny_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A randomly initialised Qwen-Image pipeline small enough for CPU unit tests.

    A 2-layer ``QwenImageTransformer2DModel`` (2 heads of 16) on 2x2-packed 4-channel latents, the causal
    ``AutoencoderKLQwenImage`` (scale factor 4) with non-identity per-channel latent statistics (Qwen-Image's first
    four), a 2-layer Qwen2.5-VL text encoder (hidden 32) whose tokenizer keeps the chat template's system prompt at
    its real 34 tokens (the pipeline drops exactly those), and Qwen-Image's dynamically shifted scheduler.
    """
    tokenizer = build_qwen_tokenizer(model_max_length=64)
    hidden = 32
    builders = {
        "transformer": lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * 4,  # packed 2x2 patches of 4 latent channels
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=hidden,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        ),
        "vae": lambda: AutoencoderKLQwenImage(
            base_dim=24,
            z_dim=4,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
            latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
        ).eval(),
        "text_encoder": lambda: tiny_qwen2_5_vl(len(tokenizer), tokenizer, hidden=hidden),
    }
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    return tiny_pipeline(QwenImagePipeline, seed, builders, scheduler=scheduler, tokenizer=tokenizer)


def _zimage_transformer(caption_dim: int) -> ZImageTransformer2DModel:
    """A 1-layer Z-Image transformer (dim 32, 2 heads, one noise and one context refiner block) whose image and
    caption pad tokens are drawn at random, right after its weights (diffusers starts them at zero)."""
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=caption_dim,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    return transformer


def tiny_zimage_pipeline(seed: int = 0, shift: float = 3.0) -> ZImagePipeline:
    """A randomly initialised Z-Image pipeline small enough for CPU unit tests.

    A 1-layer ``ZImageTransformer2DModel`` (dim 32, 2 heads, one noise and one context refiner block) whose image and
    caption pad tokens are random (diffusers starts them at zero), so the transformer's own padding of captions to a
    multiple of 32 tokens matters; a 2-layer Qwen3 text encoder (hidden 32); a 16-channel VAE (scale factor 4) with
    FLUX's latent shift and scale, as Z-Image ships FLUX.1's VAE; the flow-matching Euler scheduler with the static
    ``shift`` (3.0: Z-Image-Turbo, 6.0: Z-Image).
    """
    tokenizer = build_qwen_tokenizer(model_max_length=16)
    builders = {
        "transformer": lambda: _zimage_transformer(ZIMAGE_QWEN3.hidden),
        "vae": lambda: AutoencoderKL(
            **TINY_VAE_BLOCKS,
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "text_encoder": lambda: Qwen3Model(tiny_qwen3_config(len(tokenizer), ZIMAGE_QWEN3)).eval(),
    }
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    return tiny_pipeline(ZImagePipeline, seed, builders, scheduler=scheduler, tokenizer=tokenizer)


def _sana_dc_ae() -> AutoencoderDC:
    """A 3-block DC-AE (scale factor 4; the real one 32), the last block linear attention, with SANA's scaling
    factor."""
    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def _gemma2_encoder(vocab_size: int) -> Gemma2Model:
    """SANA's Gemma-2 text encoder of `SANA_GEMMA2` sizes (eager attention), in eval mode."""
    special_ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = Gemma2Config(**SANA_GEMMA2.config_fields(vocab_size), **special_ids, attn_implementation="eager")
    return Gemma2Model(config).eval()


def tiny_sana_pipeline(seed: int = 0, flow_shift: float = 3.0) -> SanaPipeline:
    """A randomly initialised SANA pipeline small enough for CPU unit tests.

    A 1-layer ``SanaTransformer2DModel`` (patch 1, linear self-attention, masked cross-attention), a 3-block DC-AE
    (``AutoencoderDC``, scale factor 4; the real one 32) with SANA's scaling factor, a 1-layer Gemma-2 text encoder
    (hidden 16) whose tokenizer holds the words of the pipeline's default complex human instruction whole, and the
    shipped ``DPMSolverMultistepScheduler`` on shifted flow sigmas. Sample at 32 px with
    ``use_resolution_binning=False`` (binning maps 32 px to a 512-px bin).
    """
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    tokenizer = build_gemma_tokenizer([*DEFAULT_WORDS, *re.findall(r"[A-Za-z]+", " ".join(instruction))])
    builders = {
        "transformer": lambda: SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            num_attention_heads=2,
            attention_head_dim=8,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=SANA_GEMMA2.hidden,
            sample_size=16,
        ),
        "vae": _sana_dc_ae,
        "text_encoder": lambda: _gemma2_encoder(len(tokenizer)),
    }
    scheduler = DPMSolverMultistepScheduler(
        flow_shift=flow_shift, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    return tiny_pipeline(SanaPipeline, seed, builders, tokenizer=tokenizer, scheduler=scheduler)
