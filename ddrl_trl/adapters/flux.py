"""FLUX.1: a `FluxTransformer2DModel` rectified-flow denoiser on packed latents, sampled by the Flow-GRPO SDE.

What is FLUX-specific, and lives only here:
- Latents stay `(B, C, H, W)` everywhere else (the sampler's math is elementwise); `predict` packs them into the
  2×2-patch token sequence the transformer reads, with their positional ids, and unpacks its output — the
  pipeline's own `_pack_latents` / `_unpack_latents`, as diffusers' `train_dreambooth_flux.py` does.
- The transformer takes t / 1000 (it rescales internally), and, for guidance-distilled checkpoints (FLUX.1-dev,
  `guidance_embeds=True`), the guidance value `DDRLConfig.guidance_scale` in every forward, rollout and data term
  alike, as in the training script. That embedding is not classifier-free guidance: FLUX has no trained
  unconditional branch, but `DDRLConfig.cfg_scale` > 1 gives diffusers' "true CFG" (`true_cfg_scale` with a
  negative prompt, by default the empty one), both branches carrying the same guidance embedding.
- The timestep shift depends on the image size: `mu` is linear in the number of image tokens
  (`image_token_shift_mu`, from the scheduler config), with the pipeline's base sigmas linspace(1, 1/T, T).
The data term is diffusers' FLUX recipe: x_t = (1 − t) x0 + t ε, target ε − x0, unit weighting.

FLUX.2 [dev] shares the distilled guidance and the cached position ids (`DistilledGuidance`) and, with Qwen-Image,
the shifted base-sigma schedule (`shifted_base_sigmas_sampler`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import FluxPipeline

from ..samplers import FlowSDESampler, image_token_shift_mu, pipeline_base_sigmas
from .base import Conditioning, PipelineAdapter


class DistilledGuidance:
    """Mixin for the FLUX families' guidance-distilled transformers (FLUX.1-dev, FLUX.2 [dev]): `guidance_scale`, the
    value their guidance embedding takes in every forward and pipeline call (`DDRLConfig.guidance_scale`, else
    `default_guidance_scale`); and their tokens' position ids, built once per shape (`_cached_ids`)."""

    #: The pipeline `__call__`'s default guidance value.
    default_guidance_scale: float = 3.5

    def __init__(self, pipeline, resolution: int | None = None):
        super().__init__(pipeline, resolution)
        self.guidance_scale = self.default_guidance_scale  # `configure` takes DDRLConfig.guidance_scale
        self._ids_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def configure(self, config) -> None:
        super().configure(config)
        if config.guidance_scale is not None:
            self.guidance_scale = float(config.guidance_scale)

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        """As the base, with `guidance_scale`: the distilled embedding."""
        return {**super().pipeline_call_kwargs(config, batch_size), "guidance_scale": self.guidance_scale}

    def _cached_ids(self, key: tuple, build: Callable[[], tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """The image and text tokens' position ids `build()` makes, made once per `key` (the pipeline builds them
        once per call; `predict` runs every step)."""
        if key not in self._ids_cache:
            self._ids_cache[key] = build()
        return self._ids_cache[key]


def shifted_base_sigmas_sampler(adapter: PipelineAdapter, config, device: torch.device, mu: float) -> FlowSDESampler:
    """The sampler of the FLUX-style pipelines (FLUX.1, FLUX.2, Qwen-Image): the base sigmas linspace(1, 1/T, T)
    shifted by `mu`, as the pipeline's `__call__` sets them."""
    steps = config.num_inference_steps
    return FlowSDESampler(
        adapter.pipeline.scheduler,
        steps,
        config.flow_noise_level,
        device=device,
        mu=mu,
        sigmas=pipeline_base_sigmas(adapter.pipeline.scheduler.config, steps),  # as the pipeline's __call__
    )


class FluxAdapter(DistilledGuidance, PipelineAdapter):
    """Adapter for `FluxPipeline` (FLUX.1-dev, FLUX.1-schnell) and its subclasses."""

    pipeline_classes = (FluxPipeline,)
    script_family = "flux"
    denoiser_name = "transformer"
    default_max_sequence_length = 512
    cfg_call_argument = "true_cfg_scale"
    default_negative_prompt = ""  # FluxPipeline applies true CFG only when given a negative prompt
    t5_tokenizer_name = "tokenizer_2"

    @property
    def denoiser_downsampling(self) -> int:
        return 2 * int(self.denoiser.config.patch_size)  # 2×2 packing of latent pixels into tokens

    @property
    def default_resolution(self) -> int:
        return int(self.pipeline.default_sample_size) * self.vae_scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        side = resolution // self.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.denoiser.device,
            max_sequence_length=self.t5_sequence_length(self.pipeline.tokenizer_2),
        )
        # The text ids are all zeros of shape (tokens, 3); `predict` rebuilds them, so conditioning stays batch-first.
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        batch, channels, height, width = latents.shape
        dtype, device = self.denoiser.dtype, latents.device
        packed = FluxPipeline._pack_latents(latents.to(dtype), batch, channels, height, width)
        image_ids, text_ids = self._position_ids(height, width, cond["encoder_hidden_states"].shape[1], device, dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(dtype) / 1000,  # as the pipeline: t.to(latents.dtype) / 1000
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(
            output, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor
        )

    def _position_ids(
        self, height: int, width: int, text_tokens: int, device, dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image tokens' (0, row, column) ids and the text tokens' zero ids, built once per shape."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            image_ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
            return image_ids, torch.zeros(text_tokens, 3, device=device, dtype=dtype)

        return self._cached_ids((height, width, text_tokens, device, dtype), build)

    def timestep_shift_mu(self) -> float:
        """The pipeline's `mu` for the training resolution: linear in the number of image tokens."""
        side = (self.resolution or self.default_resolution) // self.vae_scale_factor // 2
        config = self.pipeline.scheduler.config
        return image_token_shift_mu(config, side * side)

    def make_sampler(self, config, device: torch.device) -> FlowSDESampler:
        return shifted_base_sigmas_sampler(self, config, device, mu=self.timestep_shift_mu())
