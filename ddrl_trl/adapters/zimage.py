"""Z-Image / Z-Image-Turbo: a single-stream `ZImageTransformer2DModel` rectified-flow denoiser, Qwen3 captions.

What is Z-Image-specific, and lives only here (line numbers: diffusers 0.42.1 `pipeline_z_image.py`, PZ, and
`transformer_z_image.py`, TZ):
- The transformer takes Python lists: one `(C, 1, H, W)` latent per sample (PZ 530-531) and one caption of its own
  length per sample — the Qwen3 states of the prompt's real tokens only (PZ 246-251). Inside, each caption is
  padded to a multiple of 32 tokens with a *learned* pad token that is attended to (TZ 563, 780-784), so a
  caption padded by us would not give the same output. The conditioning therefore stores the captions padded to
  `max_sequence_length` plus a boolean token mask, and `predict` cuts each one back to its real tokens.
- Time runs the other way: the transformer takes (1000 − t) / 1000 = 1 − σ (PZ 511; it multiplies by
  `t_scale` = 1000 itself, TZ 955), and predicts x0 − ε, which the pipeline negates before the Euler step (PZ 568).
  `predict` returns −output = ε − x0, the velocity of x_t = (1 − σ) x0 + σ ε, as diffusers'
  `train_dreambooth_lora_z_image.py` does before regressing it on ε − x0.
- Guidance: the pipeline's `guidance_scale` g forms pos + g (pos − neg) (PZ 551), which is our
  uncond + w (cond − uncond) with w = 1 + g; g = 0 (Z-Image-Turbo's setting) is the unguided model (PZ 283).
  So `cfg_scale` = 1 + `guidance_scale`. It is plain linear CFG only with the pipeline's defaults
  `cfg_normalization=False` and `cfg_truncation=1.0` (PZ 307-308, 498-515, 553-559); `pipeline_call_kwargs`
  passes those explicitly.
- The schedule: base sigmas linspace(1, 1/T, T) (PZ 137-138) with the scheduler's static `shift` (Turbo 3.0,
  base 6.0). The pipeline also computes a FLUX-style `mu` from the image token count (PZ 471-480); it only acts if a
  scheduler has `use_dynamic_shifting`, which the shipped ones do not, but it is passed along all the same.
The data term is the training script's: x_t = (1 − σ) x0 + σ ε, target ε − x0 (on the negated output), unit
weighting with timesteps from the shifted schedule (weighting_scheme "none").
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

from ..samplers import FlowSDESampler, image_token_shift_mu
from .base import Conditioning
from .mixins import SingleTextEncoderAdapter


class ZImageAdapter(SingleTextEncoderAdapter):
    """Adapter for `ZImagePipeline` (Tongyi-MAI/Z-Image-Turbo, Tongyi-MAI/Z-Image) and its subclasses."""

    pipeline_classes = (ZImagePipeline,)
    script_family = "zimage"
    default_max_sequence_length = 512  # ZImagePipeline.__call__'s default
    # Its one text encoder is Qwen3: `max_sequence_length` is capped by its tokenizer's model_max_length.
    default_negative_prompt = ""  # ZImagePipeline.encode_prompt's default negative prompt (PZ 187-188)

    def pipeline_guidance_scale(self, cfg_scale: float) -> float:
        """The pipeline's `guidance_scale` g that samples as `cfg_scale` w: it forms pos + g (pos − neg), w = 1 + g."""
        return float(cfg_scale) - 1.0

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        kwargs = super().pipeline_call_kwargs(config, batch_size)
        kwargs["cfg_normalization"] = False  # the defaults, the only settings under which guidance is linear
        kwargs["cfg_truncation"] = 1.0
        return kwargs

    @property
    def denoiser_downsampling(self) -> int:
        return int(self.denoiser.config.all_patch_size[0])

    @property
    def default_resolution(self) -> int:
        return 1024  # ZImagePipeline.__call__: `height = height or 1024`

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The Qwen3 captions (second-to-last hidden states of the chat-templated prompt's real tokens), padded with
        zeros to `max_sequence_length` rows, and the mask of real tokens."""
        max_length = self.t5_sequence_length(self.pipeline.tokenizer)
        # A copy: `ZImagePipeline._encode_prompt` overwrites the caller's list items with the templated prompts.
        captions, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.denoiser.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        embeds = captions[0].new_zeros(len(captions), max_length, captions[0].shape[-1])
        mask = torch.zeros(len(captions), max_length, dtype=torch.bool, device=embeds.device)
        for row, caption in enumerate(captions):
            embeds[row, : len(caption)] = caption
            mask[row, : len(caption)] = True
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        # One (C, 1, H, W) frame per sample and one caption of its own length per sample, as PZ 530-536 feed them.
        frames = list(latents.to(self.denoiser.dtype).unsqueeze(2).unbind(dim=0))
        captions = [embeds[mask] for embeds, mask in zip(cond["prompt_embeds"], cond["prompt_mask"])]
        output = denoiser(frames, (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in output]).squeeze(2)  # PZ 565-568: the velocity ε − x0

    def make_sampler(self, config, device: torch.device) -> FlowSDESampler:
        steps = config.num_inference_steps
        side = (self.resolution or self.default_resolution) // self.vae_scale_factor // 2  # image tokens per side
        scheduler_config = self.pipeline.scheduler.config
        mu = image_token_shift_mu(scheduler_config, side * side)  # PZ 471-480; acts only with dynamic shifting
        return FlowSDESampler(
            self.pipeline.scheduler,
            steps,
            config.flow_noise_level,
            device=device,
            mu=mu,
            sigmas=get_default_z_image_sigmas(steps),
        )
