"""Stable Diffusion 1.x / 2.x / XL: UNet2DConditionModel denoisers with ε- or v-prediction, sampled by stochastic DDIM.

The data term uses diffusers' `train_text_to_image.py` recipe: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, unweighted MSE against ε
or v (from the scheduler's `prediction_type`).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..samplers import DDIMSDESampler
from .base import Conditioning, PipelineAdapter


class StableDiffusionAdapter(PipelineAdapter):
    """Adapter for `StableDiffusionPipeline` (SD 1.x and 2.x, ε- and v-prediction) and its subclasses."""

    pipeline_classes = (StableDiffusionPipeline,)
    script_family = "sd"
    denoiser_name = "unet"

    @property
    def denoiser_downsampling(self) -> int:
        return 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipeline.encode_prompt(
            prompts, device=self.denoiser.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds}

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        return denoiser(
            latents.to(self.denoiser.dtype), timesteps, encoder_hidden_states=cond["encoder_hidden_states"]
        ).sample

    def make_sampler(self, config, device: torch.device) -> DDIMSDESampler:
        return DDIMSDESampler(self.pipeline.scheduler.config, config.num_inference_steps, config.eta, device=device)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """Adapter for `StableDiffusionXLPipeline`: two text encoders, pooled text embeddings and size
    micro-conditioning."""

    pipeline_classes = (StableDiffusionXLPipeline,)

    @property
    def default_resolution(self) -> int:
        return int(self.pipeline.default_sample_size) * self.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pipe = self.pipeline
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=self.denoiser.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        # Micro-conditioning on (original size, crop, target size), as the pipeline does at the default resolution.
        size = (self.resolution or self.default_resolution,) * 2
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
        ).to(embeds.device)
        return {
            "encoder_hidden_states": embeds,
            "text_embeds": pooled,
            "time_ids": time_ids.repeat(len(prompts), 1),
        }

    def encode_unconditional(self, negative_prompts: list[str] | None, count: int) -> Conditioning:
        """As the pipeline: with no negative prompt and `force_zeros_for_empty_prompt` (SDXL base's setting), zero
        text embeddings and pooled embeddings; otherwise the encoded negative prompts (or the empty prompt)."""
        if negative_prompts is None and self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            cond = self.encode_prompts([""] * count)
            return {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.items()}
        return super().encode_unconditional(negative_prompts, count)

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        return denoiser(
            latents.to(self.denoiser.dtype),
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
        ).sample
