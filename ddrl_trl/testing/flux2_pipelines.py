"""Tiny FLUX.2 pipelines (`Flux2Pipeline`, FLUX.2 [dev]; `Flux2KleinPipeline`, FLUX.2 [klein]), randomly
initialised from config, fully offline.

They mirror the component layout of diffusers' own tests (tests/pipelines/flux2/test_pipeline_flux2.py and
test_pipeline_flux2_klein.py), with four deliberate differences:
- offline tokenizers (`llm_tokenizers`), ``model_max_length=16``: call with ``max_sequence_length=16``;
- narrow but deep text encoders (hidden 16, 31 / 28 layers), so the pipelines' real default hidden-state layers
  (10, 20, 30) / (9, 18, 27) exist and three of them are stacked (``joint_attention_dim`` = 3 × 16), as in the
  real models — diffusers' tests use one layer and ``text_encoder_out_layers=(1,)``;
- a 3-block ``AutoencoderKLFlux2`` (scale factor 4, 4 latent channels → 16 patchified channels) whose batch-norm
  running statistics are random, not the identity, so the latent normalisation is exercised;
- FLUX.2's real scheduler config (FLUX.1-dev's dynamically shifted flow-matching Euler, which
  scripts/convert_flux2_to_diffusers.py copies), so the empirical ``mu`` matters.
Images are 32 × 32 at ``resolution=32``: 8 × 8 VAE latents, 16 × 4 × 4 patchified, 16 image tokens.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from .llm_tokenizers import build_mistral_tokenizer, build_qwen_tokenizer

TEXT_HIDDEN = 16


def tiny_flux2_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKLFlux2:
    """Three blocks → scale factor 4; random batch-norm running mean / variance over the 4 × latent_channels
    patchified channels (the real VAE's are FLUX.2's latent statistics)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    generator = torch.Generator().manual_seed(seed)
    channels = vae.bn.num_features
    vae.bn.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return vae.eval()


def tiny_flux2_transformer(joint_attention_dim: int, guidance_embeds: bool, in_channels: int = 16):
    """One double- and one single-stream block, 2 heads of 16, 4-axis RoPE (4, 4, 4, 4) as diffusers' tests."""
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's shipped scheduler config (FLUX.1-dev's): dynamic shifting, mu supplied by the pipeline."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_flux2_pipeline(seed: int = 0, guidance_embeds: bool = True) -> Flux2Pipeline:
    """A randomly initialised FLUX.2 [dev] pipeline: Mistral3 text encoder (31 text layers of hidden 16, a 1-layer
    Pixtral vision tower), the guidance-distilled embedding when `guidance_embeds`."""
    tokenizer = build_mistral_tokenizer(model_max_length=16, whole_texts=[SYSTEM_MESSAGE])
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 32,
            "max_position_embeddings": 512,
            "num_attention_heads": 4,
            "num_hidden_layers": 31,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 11,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 32,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        image_token_index=10,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    transformer = tiny_flux2_transformer(3 * TEXT_HIDDEN, guidance_embeds)
    pipe = Flux2Pipeline(
        scheduler=flux2_scheduler(),
        vae=tiny_flux2_vae(seed=seed + 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> Flux2KleinPipeline:
    """A randomly initialised FLUX.2 [klein] pipeline: Qwen3 text encoder (28 layers of hidden 16), no guidance
    embedding. `is_distilled=False` is a klein *base* model (true CFG through `guidance_scale`); `True` the
    step-distilled klein, which ignores guidance."""
    tokenizer = build_qwen_tokenizer(model_max_length=16)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(config).eval()
    torch.manual_seed(seed)
    transformer = tiny_flux2_transformer(3 * TEXT_HIDDEN, guidance_embeds=False)
    pipe = Flux2KleinPipeline(
        scheduler=flux2_scheduler(),
        vae=tiny_flux2_vae(seed=seed + 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
