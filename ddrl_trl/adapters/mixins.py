"""Pieces several model families share, each stated once: where the denoiser's size comes from, the single-text-
encoder layout, and per-channel normalised latents. A family's adapter file composes them with `PipelineAdapter`."""

from __future__ import annotations

import torch

from .base import PipelineAdapter


class TransformerConfigSize:
    """Mixin: the denoiser's downsampling and native resolution as its config states them (`patch_size`, and
    `sample_size` in latent pixels), as SD3's and SANA's transformers do."""

    @property
    def denoiser_downsampling(self) -> int:
        return int(self.denoiser.config.patch_size)

    @property
    def default_resolution(self) -> int:
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor


class SingleTextEncoderAdapter(PipelineAdapter):
    """A family whose denoiser is `pipeline.transformer` and whose prompts go through one text encoder,
    `text_encoder`, with `tokenizer` capping `max_sequence_length` (FLUX.2, Z-Image, SANA, Wan)."""

    denoiser_name = "transformer"
    frozen_module_names = ("vae", "text_encoder")
    t5_tokenizer_name = "tokenizer"


class NormalisedLatents:
    """Mixin for families whose latents are the VAE's normalised per channel, (z − mean) / std, the statistics
    coming from `_latent_stats(like)` (FLUX.2: the VAE's batch norm; Wan: its config's `latents_mean` / `_std`).

    A family gives the raw latents of pixels in [−1, 1] (`_raw_latents`, float32) and the pixels of raw latents
    (`_raw_pixels`, float32 in [0, 1]); the normalisation in between is this mixin's."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents of `pixels` in [−1, 1]: the family's raw latents (`_raw_latents`), then
        (z − mean) / std. Float32, deterministic."""
        latents = self._raw_latents(pixels)
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels, float32 in [0, 1], of normalised `latents` (the inverse of `encode_images`): z × std + mean,
        decoded by the family's `_raw_pixels`."""
        mean, std = self._latent_stats(latents)
        return self._raw_pixels(latents.float() * std + mean)
