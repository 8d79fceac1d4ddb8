"""Tiny UNet pipelines (Stable Diffusion 1.x/2.x and XL), randomly initialised from config."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .components import DEFAULT_WORDS, build_word_tokenizer, tiny_clip_text_config, tiny_vae


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
    torch.manual_seed(seed)
    unet = tiny_unet(sample_size)
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer))).eval()
    scheduler = sd_ddim_scheduler(prediction_type)
    return assemble_sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler)


def tiny_unet(sample_size: int, norm_num_groups: int = 32) -> UNet2DConditionModel:
    """A two-level (32, 64) text-conditional UNet on 4-channel latents, cross-attention dim 32 (~0.8 M params).

    Shared by the tiny test pipelines and the digits demo's base model; seed torch before calling it.
    """
    return UNet2DConditionModel(
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
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8) -> StableDiffusionXLPipeline:
    """A randomly initialised Stable Diffusion XL pipeline small enough for CPU unit tests.

    Two CLIP text encoders (hidden 32 each; the second with a 32-dim projection whose pooled output feeds the
    UNet's ``text_time`` added conditioning), a UNet (32, 64) with cross-attention dim 64 (the two encoders'
    hidden states concatenated), the same tiny VAE as :func:`tiny_sd_pipeline` and a ``DDIMScheduler``.
    """
    tokenizer = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    tokenizer_2 = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    hidden, projection_dim, time_embed_dim = 32, 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
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
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer), hidden)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_text_config(len(tokenizer_2), hidden, projection_dim=projection_dim)
    ).eval()
    scheduler = sd_ddim_scheduler()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
