"""Stable Diffusion 3 / 3.5: an `SD3Transformer2DModel` rectified-flow denoiser, sampled by the Flow-GRPO SDE.

Conditioning: the joint CLIP-L/CLIP-G/T5 sequence and the pooled CLIP projections (`pipeline.encode_prompt`, no
guidance). The data term follows diffusers' `train_dreambooth_sd3.py`: x_t = (1 − t) x0 + t ε, target ε − x0,
unit weighting; the rollout timesteps carry the pipeline's own shift (`FlowSDESampler`).

Also here, the pieces later transformer families share with SD3 or with each other: `TransformerConfigSize` (SANA),
`SingleTextEncoderAdapter` (FLUX.2, Z-Image, SANA, Wan) and `NormalisedLatents` (FLUX.2, Wan).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from ..samplers import FlowSDESampler
from .base import Conditioning, PipelineAdapter
from .mixins import TransformerConfigSize


class StableDiffusion3Adapter(TransformerConfigSize, PipelineAdapter):
    """Adapter for `StableDiffusion3Pipeline` (SD3, SD3.5) and its subclasses."""

    pipeline_classes = (StableDiffusion3Pipeline,)
    script_family = "sd3"
    denoiser_name = "transformer"
    t5_tokenizer_name = "tokenizer_3"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pipe = self.pipeline
        tokenizer = getattr(pipe, "tokenizer_3", None)
        max_length = self.t5_sequence_length(tokenizer) if tokenizer is not None else self.max_sequence_length
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.denoiser.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        return denoiser(
            hidden_states=latents.to(self.denoiser.dtype),
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def make_sampler(self, config, device: torch.device) -> FlowSDESampler:
        return FlowSDESampler(
            self.pipeline.scheduler, config.num_inference_steps, config.flow_noise_level, device=device
        )
