"""Cosmos-Predict2.5 (NVIDIA) text-to-world / text-to-image: a `CosmosTransformer3DModel` rectified-flow denoiser.

What is Cosmos-specific, and lives only here (line numbers: diffusers 0.42.1,
pipelines/cosmos/pipeline_cosmos2_5_predict.py unless named):
- Latents, VAE and normalisation are Wan 2.1's, `(C, F', H', W')` with F' = (F − 1)/4 + 1 and per-channel
  (z − mean)/std (prepare_latents 474-476, decode 844-847), so the Wan adapter's encode/decode are reused. With
  `num_frames=1` (the pipeline's "*2Image" mode) samples are images `(B, 3, H, W)` with a one-frame latent.
- The transformer reads 17 channels: the 16 latent channels plus a condition-mask channel (all zeros in
  text-to-world: no conditioning frames, 749-751 / 436-451), and appends a padding-mask channel (zeros, 770).
- Its timestep is the flow sigma t ∈ [0, 1] itself (788-794), per latent frame `(B, 1, F', 1, 1)`: the original
  network scales its 0-1000 timesteps by 0.001 (`timestep_scale`). The sampler's units are t · 1000.
- Its output is the velocity v ≈ ε − x0 of x_t = (1 − t) x0 + t ε (UniPC `flow_prediction`: x0 = x_t − t v), ours.
- Guidance is `v_c + w (v_c − v_u)` (820), the authors' video2world form, i.e. the usual v_u + s (v_c − v_u) with
  s = 1 + w: `DDRLConfig.cfg_scale` = 1 + the pipeline's `guidance_scale` (Cosmos' default 7 → cfg_scale 8). The
  pipeline enables guidance only for w > 1 (`do_classifier_free_guidance`), so it cannot express 1 < cfg_scale ≤ 2.
  The unconditional branch is the pipeline's long default negative prompt (`DEFAULT_NEGATIVE_PROMPT`, 63-70).
- Prompts: Qwen2.5-VL ("Cosmos-Reason1-7B") on a chat template with a fixed system prompt, padded to
  `max_sequence_length` (512) without an attention mask; every hidden layer but the embeddings, each normalised to zero
  mean / unit std over features, concatenated (28 × 3584 = 100352 wide) (254-321). The transformer projects it.
- The schedule is the shipped scheduler's: EDM Karras sigmas s ∈ [0.01, 200] (ρ = 7) mapped to flow time
  t = s / (1 + s) (scheduling_unipc_multistep.py:375-395), t_0 = 200/201. The pipeline feeds the exact float sigma
  (788), while UniPC's `timesteps` are truncated to integers (466): the sampler's timesteps are rebuilt from sigmas.
The data term is the authors' rectified-flow loss (cosmos-predict2.5 `schedulers/rectified_flow.py:171-172`,
`models/text2world_model_rectified_flow.py:387-401`): x_t = t ε + (1 − t) x0, target ε − x0, uniform weight; random
training times follow their density t = sigmoid(N(log 5, 1)) (logit-normal, shift 5).
"""

from __future__ import annotations

import math

import torch
from diffusers import Cosmos2_5_PredictBasePipeline
from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT

from ..samplers import FlowSDESampler
from .base import Conditioning
from .wan import WanAdapter


class CosmosFlowSDESampler(FlowSDESampler):
    """`FlowSDESampler` on the Cosmos schedule: float timesteps t · 1000 exactly as the pipeline feeds them, and the
    authors' logit-normal training times."""

    #: The authors' training-time density: logit(t) ~ N(log 5, 1) (their "logitnormal" times shifted by 5).
    logit_mean, logit_std = math.log(5.0), 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # UniPC stores int64 timesteps (truncated t · 1000); the pipeline feeds the transformer sigmas[i] (788).
        self.timesteps = self.sigmas[:-1] * self.num_train_timesteps

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, generator=generator, device=generator.device)
        return torch.sigmoid(self.logit_mean + self.logit_std * z) * self.num_train_timesteps


class CosmosPredict25Adapter(WanAdapter):
    """Adapter for `Cosmos2_5_PredictBasePipeline` (Cosmos-Predict2.5 2B / 14B), text-to-world and text-to-image."""

    pipeline_classes = (Cosmos2_5_PredictBasePipeline,)
    script_family = "cosmos"
    default_max_sequence_length = 512  # Cosmos2_5_PredictBasePipeline.__call__'s default
    default_negative_prompt = DEFAULT_NEGATIVE_PROMPT
    default_num_frames = 93  # the pipeline's default (and the DDRL paper's videos)

    def __init__(self, pipeline, resolution: int | None = None):
        super().__init__(pipeline, resolution)
        #: Pixel frames per sample; `num_frames` is the same for videos, None for images (`frames == 1`).
        self.frames = self.num_frames

    def configure(self, config) -> None:
        if 1 < config.cfg_scale <= 2:
            raise ValueError(
                f"cfg_scale={config.cfg_scale}: Cosmos2_5_PredictBasePipeline guides with v_c + g (v_c − v_u), i.e. "
                "cfg_scale = 1 + guidance_scale, and only for guidance_scale > 1, so it cannot sample a cfg_scale in "
                "(1, 2]: set cfg_scale=1 (unguided) or > 2 (Cosmos' default guidance_scale 7 is cfg_scale=8)."
            )
        super().configure(config)  # checks 4k + 1 frames; 1 frame is the pipeline's text-to-image mode
        self.frames = self.num_frames
        if self.frames == 1:
            self.num_frames = None  # the trainer then handles images (B, 3, H, W)

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        kwargs = super().pipeline_call_kwargs(config, batch_size)
        kwargs["num_frames"] = self.frames
        return kwargs

    def pipeline_guidance_scale(self, cfg_scale: float) -> float:
        """The pipeline's `guidance_scale` g for `cfg_scale` w = 1 + g (1.0, which it reads as unguided, for w = 1)."""
        return float(cfg_scale) - 1.0 if cfg_scale > 1 else 1.0

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_spatial)

    @property
    def temporal_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_temporal)

    @property
    def default_resolution(self) -> int:
        return 704  # the pipeline's default height (704 x 1280); DDRL trains square clips

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        side = resolution // self.vae_scale_factor
        frames = (self.frames - 1) // self.temporal_scale_factor + 1
        return (self.denoiser.config.out_channels, frames, side, side)  # in_channels also counts the mask channel

    @torch.no_grad()
    def encode_null(self, count: int) -> Conditioning:
        """The null conditioning the authors trained with (text dropout 0.2 with `use_empty_string=False`: the prompt
        embedding zeroed, cosmos-predict2.5 conditioner.py:269-275 / 215-223). Not the pipeline's unconditional
        branch (its default negative prompt, `encode_unconditional(None)`): the trainer's data-term prompt dropout
        uses this one, so it never trains the negative prompt."""
        embeds = self.encode_prompts([""])["encoder_hidden_states"]
        return {"encoder_hidden_states": torch.zeros_like(embeds).expand(count, -1, -1).contiguous()}

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        batch, _, frames, height, width = latents.shape
        dtype = self.denoiser.dtype
        # Text-to-world inputs of the pipeline's loop (770, 788-796): t per latent frame, zero condition and padding
        # masks (the padding mask is given at latent size: the transformer resizes it to that, nearest, anyway).
        sigma = (
            (timesteps.float() / self.pipeline.scheduler.config.num_train_timesteps)
            .view(batch, 1, 1, 1, 1)
            .expand(batch, 1, frames, 1, 1)
        )
        zeros = latents.new_zeros(batch, 1, frames, height, width, dtype=dtype)
        return denoiser(
            hidden_states=latents.to(dtype),
            condition_mask=zeros,
            timestep=sigma,
            encoder_hidden_states=cond["encoder_hidden_states"],
            padding_mask=latents.new_zeros(1, 1, height, width, dtype=dtype),
            return_dict=False,
        )[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents `(B, C, F', H', W')` of videos `(B, F, 3, H, W)` (or images `(B, 3, H, W)`) in [−1, 1]: the VAE
        posterior mean (the pipeline's `sample_mode="argmax"`), normalised per channel."""
        return super().encode_images(pixels.unsqueeze(1) if pixels.dim() == 4 else pixels)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos `(B, F, 3, H, W)` (images `(B, 3, H, W)` when `num_frames=1`), float32 in [0, 1]."""
        video = super().decode_latents(latents)
        return video[:, 0] if self.num_frames is None and video.shape[1] == 1 else video

    def make_sampler(self, config, device: torch.device) -> CosmosFlowSDESampler:
        steps, noise_level = config.num_inference_steps, config.flow_noise_level
        return CosmosFlowSDESampler(self.pipeline.scheduler, steps, noise_level, device=device)
