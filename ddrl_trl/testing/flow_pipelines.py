"""Tiny rectified-flow pipelines (SD3, FLUX.1, Wan 2.1 text-to-video), randomly initialised from config.

Each mirrors the component layout of diffusers' own tests for that pipeline, with offline tokenizers from
`components`. All tokenizers have ``model_max_length=16``: pass ``max_sequence_length=16`` when calling the pipeline.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, UMT5EncoderModel

from .components import (
    DEFAULT_WORDS,
    build_t5_word_tokenizer,
    build_word_tokenizer,
    tiny_clip_text_config,
    tiny_t5_config,
    tiny_vae,
)


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 8) -> StableDiffusion3Pipeline:
    """A randomly initialised Stable Diffusion 3 pipeline small enough for CPU unit tests.

    Mirrors diffusers' own SD3 test components: a 1-layer ``SD3Transformer2DModel`` (patch 1, 4 heads of 8),
    two CLIP text encoders with projection (hidden 32, projection 32; their pooled outputs concatenate to the
    transformer's 64-dim pooled projection) with word tokenizers, a 1-layer T5 encoder (d_model 32) with an offline
    unigram tokenizer holding every word of :data:`DEFAULT_WORDS` (other words are spelled out by characters), the
    tiny VAE of :func:`tiny_sd_pipeline` with SD3's latent shift and scale, and a flow-matching Euler scheduler.
    Images are ``4 * sample_size`` pixels wide (32x32 by default). All tokenizers have ``model_max_length=16``;
    pass ``max_sequence_length=16`` to the pipeline so T5 does not pad prompts to 256 tokens.
    """
    tokenizer = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    tokenizer_2 = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    tokenizer_3 = build_t5_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    hidden = 32
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=hidden,
        joint_attention_dim=hidden,  # T5's d_model; the 64-dim concatenated CLIP states are cut to it
        pooled_projection_dim=2 * hidden,
        out_channels=4,
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(len(tokenizer), hidden)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(len(tokenizer_2), hidden)).eval()
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(tiny_t5_config(len(tokenizer_3), hidden)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A randomly initialised FLUX.1 pipeline small enough for CPU unit tests.

    A ``FluxTransformer2DModel`` with one double-stream and one single-stream block (2 heads of 16, RoPE axes
    (4, 6, 6)) on 2x2-packed 4-channel latents, with the distilled guidance embedding of FLUX.1-dev when
    ``guidance_embeds`` (FLUX.1-schnell has none); a CLIP text encoder (pooled 32) and a 1-layer T5 (d_model 32);
    the tiny VAE (scale factor 4) with FLUX's latent shift and scale; FLUX.1-dev's dynamically shifted flow-matching
    scheduler. FLUX's native size is 1024 px: train the tiny one with ``resolution=32`` (8x8 latents, 16 tokens).
    """
    tokenizer = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    tokenizer_2 = build_t5_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    hidden = 32
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # packed 2x2 patches of 4 latent channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        pooled_projection_dim=hidden,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer), hidden)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(tiny_t5_config(len(tokenizer_2), hidden)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_pipeline(seed: int = 0, flow_shift: float = 3.0) -> WanPipeline:
    """A randomly initialised Wan 2.1 text-to-video pipeline small enough for CPU unit tests.

    A 2-layer ``WanTransformer3DModel`` (patch (1, 2, 2), 2 heads of 12) on 16-channel latents, the causal 3-D
    ``AutoencoderKLWan`` of diffusers' Wan tests (base dim 3; 4x temporal and 8x spatial compression, Wan's per-channel
    latent mean and std), a 1-layer UMT5 text encoder (d_model 32) and, as the Hub's Wan 2.1 repos ship, a
    ``UniPCMultistepScheduler`` on shifted flow sigmas. Videos of 4k + 1 frames at multiples of 16 px work; 9 frames
    at 16x16 (latents 3x2x2) sample in a fraction of a second.
    """
    tokenizer = build_t5_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(tiny_t5_config(len(tokenizer), 32)).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
