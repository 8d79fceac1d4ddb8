"""Tiny rectified-flow pipelines (SD3, FLUX.1, Wan 2.1 text-to-video), randomly initialised from config.

Each mirrors the component layout of diffusers' own tests for that pipeline, with offline tokenizers from
`components`. All tokenizers have ``model_max_length=16``: pass ``max_sequence_length=16`` when calling the pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from diffusers import (
    AutoencoderKL,
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
from transformers import CLIPTextModel, CLIPTextModelWithProjection, UMT5EncoderModel

from .components import (
    DEFAULT_WORDS,
    build_t5_word_tokenizer,
    build_word_tokenizer,
    clip_text_encoder,
    t5_text_encoder,
    tiny_pipeline,
    tiny_vae,
)

#: FLUX.1-dev's shipped scheduler config (FLUX.2 ships the same): dynamic shifting, mu supplied by the pipeline.
FLUX_SCHEDULER_CONFIG: dict[str, Any] = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

#: The transformer blocks of the tiny FLUX.1 and FLUX.2 models, as diffusers' tests: one double-stream and one
#: single-stream block of 2 heads of 16, on 2x2-packed patches of 4 latent channels.
TINY_FLUX_BLOCKS: dict[str, Any] = dict(
    patch_size=1,
    in_channels=4 * 4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's (and FLUX.2's) scheduler: `FLUX_SCHEDULER_CONFIG`."""
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)


def tiny_vae_with_latent_stats(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """`tiny_vae` with a model's latent shift and scale (registered after construction, as the real configs hold
    them); seed torch before calling it."""
    vae = tiny_vae()
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    return vae


def tiny_wan_vae() -> AutoencoderKLWan:
    """The causal 3-D ``AutoencoderKLWan`` of diffusers' Wan and Cosmos tests: base dim 3, 4x temporal and 8x spatial
    compression, Wan 2.1's per-channel latent mean and std; seed torch before calling it."""
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _clip_t5_text_stack(hidden: int, clip_classes: list[type]) -> tuple[dict[str, Any], dict[str, Callable]]:
    """The text side of SD3 and FLUX.1: a CLIP text encoder of each of ``clip_classes``, then a 1-layer T5, all of
    width ``hidden``, with word tokenizers of :data:`DEFAULT_WORDS`. Returns the tokenizers and the text-encoder
    builders, named as the pipelines name them (``tokenizer``, ``tokenizer_2``, ...; ``text_encoder``, ...)."""
    tokenizers = [build_word_tokenizer(DEFAULT_WORDS, model_max_length=16) for _ in clip_classes]
    tokenizers.append(build_t5_word_tokenizer(DEFAULT_WORDS, model_max_length=16))
    encoders = [functools.partial(clip_text_encoder, t, hidden, cls) for t, cls in zip(tokenizers, clip_classes)]
    encoders.append(functools.partial(t5_text_encoder, tokenizers[-1], hidden))
    suffixes = [""] + [f"_{i}" for i in range(2, len(tokenizers) + 1)]
    return (
        {f"tokenizer{suffix}": tokenizer for suffix, tokenizer in zip(suffixes, tokenizers)},
        {f"text_encoder{suffix}": encoder for suffix, encoder in zip(suffixes, encoders)},
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
    hidden = 32
    tokenizers, text_encoders = _clip_t5_text_stack(hidden, [CLIPTextModelWithProjection] * 2)
    builders = {
        "transformer": lambda: SD3Transformer2DModel(
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
        ),
        "vae": lambda: tiny_vae_with_latent_stats(shift_factor=0.0609, scaling_factor=1.5035),
        **text_encoders,
    }
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return tiny_pipeline(StableDiffusion3Pipeline, seed, builders, scheduler=scheduler, **tokenizers)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A randomly initialised FLUX.1 pipeline small enough for CPU unit tests.

    A ``FluxTransformer2DModel`` with one double-stream and one single-stream block (2 heads of 16, RoPE axes
    (4, 6, 6)) on 2x2-packed 4-channel latents, with the distilled guidance embedding of FLUX.1-dev when
    ``guidance_embeds`` (FLUX.1-schnell has none); a CLIP text encoder (pooled 32) and a 1-layer T5 (d_model 32);
    the tiny VAE (scale factor 4) with FLUX's latent shift and scale; FLUX.1-dev's dynamically shifted flow-matching
    scheduler. FLUX's native size is 1024 px: train the tiny one with ``resolution=32`` (8x8 latents, 16 tokens).
    """
    hidden = 32
    tokenizers, text_encoders = _clip_t5_text_stack(hidden, [CLIPTextModel])
    builders = {
        "transformer": lambda: FluxTransformer2DModel(
            **TINY_FLUX_BLOCKS,
            joint_attention_dim=hidden,
            pooled_projection_dim=hidden,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        ),
        "vae": lambda: tiny_vae_with_latent_stats(shift_factor=0.1159, scaling_factor=0.3611),
        **text_encoders,
    }
    return tiny_pipeline(FluxPipeline, seed, builders, scheduler=flux_scheduler(), **tokenizers)


def tiny_wan_pipeline(seed: int = 0, flow_shift: float = 3.0) -> WanPipeline:
    """A randomly initialised Wan 2.1 text-to-video pipeline small enough for CPU unit tests.

    A 2-layer ``WanTransformer3DModel`` (patch (1, 2, 2), 2 heads of 12) on 16-channel latents, the causal 3-D
    ``AutoencoderKLWan`` of diffusers' Wan tests (`tiny_wan_vae`), a 1-layer UMT5 text encoder (d_model 32) and, as
    the Hub's Wan 2.1 repos ship, a ``UniPCMultistepScheduler`` on shifted flow sigmas. Videos of 4k + 1 frames at
    multiples of 16 px work; 9 frames at 16x16 (latents 3x2x2) sample in a fraction of a second.
    """
    tokenizer = build_t5_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    builders = {
        "transformer": lambda: WanTransformer3DModel(
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
        ),
        "vae": tiny_wan_vae,
        "text_encoder": lambda: t5_text_encoder(tokenizer, 32, UMT5EncoderModel),
    }
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
    )
    return tiny_pipeline(WanPipeline, seed, builders, tokenizer=tokenizer, scheduler=scheduler)
