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

from collections.abc import Callable

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from .components import TINY_VAE_BLOCKS, DecoderSize, tiny_pipeline
from .dit_pipelines import tiny_qwen3_config
from .flow_pipelines import TINY_FLUX_BLOCKS, flux_scheduler
from .llm_tokenizers import build_mistral_tokenizer, build_qwen_tokenizer

#: The width of both FLUX.2 text encoders; the pipelines stack three of their hidden-state layers.
TEXT_HIDDEN = 16
#: FLUX.2 [dev]'s Mistral text layers: 31, so the pipeline's default layers (10, 20, 30) exist; 4 heads of 4.
FLUX2_MISTRAL = DecoderSize(hidden=TEXT_HIDDEN, layers=31, heads=4, kv_heads=2, max_positions=512, head_dim=4)
#: FLUX.2 [klein]'s Qwen3 layers: 28, so the pipeline's default layers (9, 18, 27) exist; 2 heads of 8.
KLEIN_QWEN3 = DecoderSize(hidden=TEXT_HIDDEN, layers=28, heads=2, kv_heads=2, max_positions=512, head_dim=8)


def tiny_flux2_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKLFlux2:
    """Three blocks → scale factor 4; random batch-norm running mean / variance over the 4 × latent_channels
    patchified channels (the real VAE's are FLUX.2's latent statistics)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(latent_channels=latent_channels, **TINY_VAE_BLOCKS)
    generator = torch.Generator().manual_seed(seed)
    channels = vae.bn.num_features
    vae.bn.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return vae.eval()


def tiny_flux2_transformer(joint_attention_dim: int, guidance_embeds: bool, in_channels: int = 16):
    """One double- and one single-stream block, 2 heads of 16 (`TINY_FLUX_BLOCKS`), 4-axis RoPE (4, 4, 4, 4) as
    diffusers' tests."""
    return Flux2Transformer2DModel(
        **dict(TINY_FLUX_BLOCKS, in_channels=in_channels),
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def _tiny_flux2(pipeline_class: type, seed: int, tokenizer, text_encoder: Callable, guidance_embeds: bool, **parts):
    """A FLUX.2 pipeline of ``pipeline_class`` around ``tokenizer`` and the text encoder ``text_encoder()`` builds.

    The text encoder is built first (seeded ``seed + 2``), then the transformer (``seed``), then the VAE
    (``seed + 1``): the order these pipelines have always been built in, which fixes the global RNG state a build
    leaves behind."""
    builders = {
        "text_encoder": text_encoder,
        "transformer": lambda: tiny_flux2_transformer(3 * TEXT_HIDDEN, guidance_embeds),
        "vae": lambda: tiny_flux2_vae(seed=seed + 1),
    }
    return tiny_pipeline(
        pipeline_class, seed, builders, (2, 0, 1), scheduler=flux_scheduler(), tokenizer=tokenizer, **parts
    )


def _mistral3_config(vocab_size: int) -> Mistral3Config:
    """FLUX.2 [dev]'s text encoder: `FLUX2_MISTRAL` text layers with Mistral's special ids, a 1-layer Pixtral
    tower."""
    return Mistral3Config(
        text_config={
            **FLUX2_MISTRAL.config_fields(vocab_size),
            "model_type": "mistral",
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


def tiny_flux2_pipeline(seed: int = 0, guidance_embeds: bool = True) -> Flux2Pipeline:
    """A randomly initialised FLUX.2 [dev] pipeline: Mistral3 text encoder (31 text layers of hidden 16, a 1-layer
    Pixtral vision tower), the guidance-distilled embedding when `guidance_embeds`."""
    tokenizer = build_mistral_tokenizer(model_max_length=16, whole_texts=[SYSTEM_MESSAGE])
    config = _mistral3_config(len(tokenizer))
    text_encoder = lambda: Mistral3ForConditionalGeneration(config).eval()  # noqa: E731
    return _tiny_flux2(Flux2Pipeline, seed, tokenizer, text_encoder, guidance_embeds)


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> Flux2KleinPipeline:
    """A randomly initialised FLUX.2 [klein] pipeline: Qwen3 text encoder (28 layers of hidden 16), no guidance
    embedding. `is_distilled=False` is a klein *base* model (true CFG through `guidance_scale`); `True` the
    step-distilled klein, which ignores guidance."""
    tokenizer = build_qwen_tokenizer(model_max_length=16)
    config = tiny_qwen3_config(len(tokenizer), KLEIN_QWEN3, pad_token_id=tokenizer.pad_token_id)
    text_encoder = lambda: Qwen3ForCausalLM(config).eval()  # noqa: E731
    return _tiny_flux2(Flux2KleinPipeline, seed, tokenizer, text_encoder, False, is_distilled=is_distilled)
