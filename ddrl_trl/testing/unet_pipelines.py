"""Tiny UNet pipelines (Stable Diffusion 1.x/2.x and XL), randomly initialised from config."""

from __future__ import annotations

from collections.abc import Iterable

from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection

from .components import (
    DEFAULT_WORDS,
    build_word_tokenizer,
    clip_text_encoder,
    quiet_pipeline,
    seeded_parts,
    tiny_pipeline,
    tiny_vae,
)


def tiny_sd_pipeline(
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 8,
    words: Iterable[str] | None = None,
) -> StableDiffusionPipeline:
    """A randomly initialised Stable Diffusion pipeline small enough for CPU unit tests.

    UNet (32, 64) with one layer per block and cross-attention dim 32, a 3-block VAE (scale factor 4, so the
    default 8x8 latents are 32x32 images), a 2-layer CLIP text encoder (hidden 32, in eval mode) with a word
    tokenizer and a ``DDIMScheduler``. Two calls with the same arguments give identical weights.

    Args:
        seed: seeds the weight initialisation of every component.
        prediction_type: the scheduler's parameterisation, ``"epsilon"`` or ``"v_prediction"``.
        sample_size: latent side length; images are ``4 * sample_size`` pixels wide.
        words: whole-word tokens for the tokenizer (default :data:`DEFAULT_WORDS`).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    tokenizer = build_word_tokenizer(DEFAULT_WORDS if words is None else words, model_max_length=16)
    builders = {
        "unet": lambda: tiny_unet(sample_size),
        "vae": tiny_vae,
        "text_encoder": lambda: clip_text_encoder(tokenizer),
    }
    return assemble_sd_pipeline(
        tokenizer=tokenizer, scheduler=sd_ddim_scheduler(prediction_type), **seeded_parts(seed, builders)
    )


def tiny_unet(sample_size: int, norm_num_groups: int = 32, **overrides) -> UNet2DConditionModel:
    """A two-level (32, 64) text-conditional UNet on 4-channel latents, cross-attention dim 32 (~0.8 M params);
    ``overrides`` replace or add ``UNet2DConditionModel`` arguments (the SDXL variant's).

    Shared by the tiny test pipelines and the digits demo's base model; seed torch before calling it.
    """
    config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=norm_num_groups,
    )
    return UNet2DConditionModel(**{**config, **overrides})


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's scaled-linear β schedule in a `DDIMScheduler` (`steps_offset=1` avoids a deprecation
    warning)."""
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def assemble_sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` from its parts, with no safety checker and no progress bar (for tests and demos)."""
    return quiet_pipeline(
        StableDiffusionPipeline,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_unet(sample_size: int, hidden: int = 32, projection_dim: int = 32, time_embed_dim: int = 8):
    """The SDXL variant of `tiny_unet`: its cross-attention block second, linear projections, cross-attention dim
    ``2 * hidden`` (two text encoders' hidden states concatenated) and the ``text_time`` added conditioning."""
    return tiny_unet(
        sample_size,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # SDXL adds 6 micro-conditioning numbers (original size, crop, target size), each Fourier-embedded,
        # to the pooled embedding of the second text encoder.
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        cross_attention_dim=2 * hidden,
    )


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8) -> StableDiffusionXLPipeline:
    """A randomly initialised Stable Diffusion XL pipeline small enough for CPU unit tests.

    Two CLIP text encoders (hidden 32 each; the second with a 32-dim projection whose pooled output feeds the
    UNet's ``text_time`` added conditioning), a UNet (32, 64) with cross-attention dim 64 (the two encoders'
    hidden states concatenated), the same tiny VAE as :func:`tiny_sd_pipeline` and a ``DDIMScheduler``.
    """
    tokenizer = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    tokenizer_2 = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    hidden, projection_dim = 32, 32
    builders = {
        "unet": lambda: tiny_sdxl_unet(sample_size, hidden, projection_dim),
        "vae": tiny_vae,
        "text_encoder": lambda: clip_text_encoder(tokenizer, hidden),
        "text_encoder_2": lambda: clip_text_encoder(
            tokenizer_2, hidden, CLIPTextModelWithProjection, projection_dim=projection_dim
        ),
    }
    return tiny_pipeline(
        StableDiffusionXLPipeline,
        seed,
        builders,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=sd_ddim_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
