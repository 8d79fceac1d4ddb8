"""Wan 2.1 / 2.2 text-to-video: a `WanTransformer3DModel` rectified-flow denoiser on 5-D video latents.

What is Wan-specific, and lives only here:
- Samples are videos. Latents are `(C, F', H', W')` with F' = (F − 1) / 4 + 1 (the causal VAE keeps the first frame
  and compresses the rest 4×); pixels go in and out as `(B, F, 3, H, W)`, the layout of the pipeline's `"pt"` output.
- The VAE latents are normalised per channel, (z − latents_mean) / latents_std, as `WanPipeline` undoes at decoding.
- The transformer takes the raw timestep t · 1000; Wan 2.2's `expand_timesteps` variant (TI2V-5B) takes it per token.
- The schedule is the pipeline scheduler's shifted flow sigmas (Wan ships `UniPCMultistepScheduler` with
  `flow_shift`; a `FlowMatchEulerDiscreteScheduler` with `shift` works the same).
The data term is the rectified-flow recipe Wan is trained with: x_t = (1 − t) x0 + t ε, target ε − x0, unit
weighting (as in finetrainers' Wan specification and diffusers' flow-matching scripts).
"""

from __future__ import annotations

import torch
from diffusers import WanPipeline

from ..samplers import FlowSDESampler
from .base import Conditioning
from .mixins import NormalisedLatents, SingleTextEncoderAdapter


class WanAdapter(NormalisedLatents, SingleTextEncoderAdapter):
    """Adapter for `WanPipeline` (text-to-video) with one transformer (Wan 2.1, Wan 2.2 TI2V-5B)."""

    pipeline_classes = (WanPipeline,)
    script_family = "wan"
    default_max_sequence_length = 512  # WanPipeline.__call__'s default
    #: The pipeline's default frame count (`WanPipeline.__call__`).
    default_num_frames = 81

    def __init__(self, pipeline, resolution: int | None = None):
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
            raise ValueError(
                "This WanPipeline has two expert transformers (Wan 2.2 A14B: `transformer_2` and `boundary_ratio`); "
                "DDRLTrainer trains a single denoiser. Use a one-transformer Wan checkpoint (Wan 2.1, Wan 2.2 "
                "TI2V-5B), or load the pipeline with transformer_2=None and boundary_ratio=None to train the "
                "high-noise expert alone."
            )
        super().__init__(pipeline, resolution)
        self.num_frames = self.default_num_frames

    def configure(self, config) -> None:
        super().configure(config)
        num_frames = config.num_frames or self.default_num_frames
        factor = self.temporal_scale_factor
        if (num_frames - 1) % factor:
            lower = (num_frames - 1) // factor * factor + 1
            raise ValueError(
                f"num_frames={num_frames} does not fit Wan's VAE, which compresses time {factor}×: it must be "
                f"{factor}k + 1 (e.g. {lower} or {lower + factor}). Set num_frames in DDRLConfig to match your "
                f"reference videos."
            )
        self.num_frames = num_frames

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        return {**super().pipeline_call_kwargs(config, batch_size), "num_frames": self.num_frames}

    @property
    def temporal_scale_factor(self) -> int:
        return int(self.pipeline.vae.config.scale_factor_temporal)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae.config.scale_factor_spatial)

    @property
    def denoiser_downsampling(self) -> int:
        return int(self.denoiser.config.patch_size[1])

    @property
    def default_resolution(self) -> int:
        return 480  # WanPipeline's default height (480p); DDRL trains square clips

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        side = resolution // self.vae_scale_factor
        frames = (self.num_frames - 1) // self.temporal_scale_factor + 1
        return (self.denoiser.config.in_channels, frames, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            device=self.denoiser.device,
            max_sequence_length=self.t5_sequence_length(self.pipeline.tokenizer),
        )
        return {"encoder_hidden_states": embeds}

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        if self.pipeline.config.get("expand_timesteps", False):
            # Wan 2.2 TI2V: one timestep per latent token (all equal for text-to-video), as the pipeline builds them.
            patch = self.denoiser.config.patch_size
            tokens = latents.shape[2] // patch[0] * (latents.shape[3] // patch[1]) * (latents.shape[4] // patch[2])
            timesteps = timesteps[:, None].expand(-1, tokens)
        return denoiser(
            hidden_states=latents.to(self.denoiser.dtype),
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
        )[0]

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel `latents_mean` and `latents_std` of the VAE config, `(1, C, 1, 1, 1)` float32."""
        config = self.pipeline.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(config.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    # `encode_images` / `decode_latents` (`NormalisedLatents`): latents `(B, C, F', H', W')` of videos
    # `(B, F, 3, H, W)`, normalised per channel as `(z − latents_mean) / latents_std`, float32.
    def _raw_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior mean of videos `pixels` `(B, F, 3, H, W)` in [−1, 1], float32."""
        vae = self.pipeline.vae
        video = pixels.to(device=vae.device, dtype=vae.dtype).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W) for the VAE
        return vae.encode(video).latent_dist.mean.float()

    def _raw_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos `(B, F, 3, H, W)`, float32 in [0, 1], of raw (unnormalised) latents."""
        vae = self.pipeline.vae
        video = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def make_sampler(self, config, device: torch.device) -> FlowSDESampler:
        steps, noise_level = config.num_inference_steps, config.flow_noise_level
        return FlowSDESampler(self.pipeline.scheduler, steps, noise_level, device=device)
