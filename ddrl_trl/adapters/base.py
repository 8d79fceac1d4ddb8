"""The interface between the trainer and one family of diffusers pipelines.

The trainer only ever talks to a `PipelineAdapter`: it encodes prompts, runs the denoiser, encodes reference images,
decodes rollouts, builds the family's SDE sampler and saves weights. Everything specific to a model family (its
conditioning, its latent space, its sampler and training target, its LoRA file layout) lives in one adapter file.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.guidance import combine_guidance

Conditioning = dict[str, torch.Tensor]
"""Flat dict of per-sample conditioning tensors (batch dimension first), as returned by `encode_prompts`."""


def repeat_conditioning(cond: Conditioning, repeats: int | Sequence[int]) -> Conditioning:
    """Repeat row k of every conditioning tensor `repeats` (or `repeats[k]`) times along the batch."""
    if isinstance(repeats, int):
        return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}
    return {k: v.repeat_interleave(torch.as_tensor(repeats, device=v.device), dim=0) for k, v in cond.items()}


def select_conditioning(cond: Conditioning, index: torch.Tensor | slice) -> Conditioning:
    """Rows `index` of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}


def concat_conditioning(first: Conditioning, second: Conditioning) -> Conditioning:
    """Stack two conditionings along the batch, so two sub-batches share one denoiser forward."""
    return {k: torch.cat([first[k], second[k]], dim=0) for k in first}


class PipelineAdapter(ABC):
    """What DDRL needs from a model family. Subclass it and `register_adapter` it to support a new pipeline.

    Attributes:
        pipeline_classes: the diffusers pipeline classes (and their subclasses) this adapter serves.
        script_family: the `ddrl-trl train --family` for these pipelines (`scripts.FAMILY_DEFAULTS`).
        denoiser_name: the pipeline attribute holding the trained network (`"unet"`, `"transformer"`).
        default_lora_target_modules: modules a `LoraConfig` without `target_modules` is applied to.
        frozen_module_names: pipeline attributes that are used but never trained (absent ones are skipped).
        supports_cfg: whether the denoiser has an unconditional branch for classifier-free guidance
            (`DDRLConfig.cfg_scale`); a family without one refuses guidance in `configure`.
        cfg_call_argument: the pipeline `__call__` argument that sets the classifier-free guidance scale
            (its value: `pipeline_guidance_scale`).
    """

    pipeline_classes: tuple[type, ...] = ()
    #: The `ddrl-trl train --family` whose defaults suit this family (None: none of the shipped ones).
    script_family: str | None = None
    denoiser_name: str = "unet"
    default_lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    frozen_module_names: tuple[str, ...] = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    #: Frames per sample for video families (set by `configure`); None for image families.
    num_frames: int | None = None
    #: The pipeline's default T5 prompt length, for families with a T5 encoder.
    default_max_sequence_length: int = 256
    supports_cfg: bool = True
    cfg_call_argument: str = "guidance_scale"
    #: The negative prompt the rollouts use when none is set, where the pipeline needs one for guidance (FLUX: "").
    default_negative_prompt: str | None = None
    #: The pipeline attribute of the T5 tokenizer whose length `max_sequence_length` sets (None: no T5 encoder).
    t5_tokenizer_name: str | None = None

    def __init__(self, pipeline: Any, resolution: int | None = None):
        self.pipeline = pipeline
        #: Training resolution in pixels (set by `configure`); None = native.
        self.resolution = resolution
        #: Prompt tokens for T5 encoders (set by `configure`).
        self.max_sequence_length = self.default_max_sequence_length

    def configure(self, config) -> None:
        """Take the training options from a `DDRLConfig`, validating them against this pipeline; raises
        `ValueError` naming the fix. Subclasses with options of their own (guidance, frame count) extend it."""
        resolution = config.resolution or self.default_resolution
        self.validate_resolution(resolution)
        self.resolution = resolution
        self.max_sequence_length = config.max_sequence_length or self.default_max_sequence_length
        if not self.supports_cfg and (config.cfg_scale > 1 or config.resolved_data_prompt_dropout > 0):
            raise ValueError(
                f"{type(self.pipeline).__name__} has no unconditional branch, so it cannot be sampled with "
                f"classifier-free guidance: set cfg_scale=1.0 and data_prompt_dropout=0 (got cfg_scale="
                f"{config.cfg_scale}, data_prompt_dropout={config.resolved_data_prompt_dropout})."
            )

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        """The arguments of a pipeline call on `batch_size` prompts (a list) that samples as the rollouts of `config`
        do, noise aside: steps, size, classifier-free guidance and negative prompts (for
        `build_synthetic_reference_dataset` and the benchmarks)."""
        resolution = config.resolution or self.default_resolution
        if config.negative_prompt_column is not None:
            raise ValueError(
                "negative_prompt_column gives each dataset row its own negative prompt; a pipeline call on new "
                "prompts has no such column: pass negative_prompt=[...] to the call yourself."
            )
        kwargs = {
            "num_inference_steps": config.num_inference_steps,
            "height": resolution,
            "width": resolution,
            self.cfg_call_argument: self.pipeline_guidance_scale(config.cfg_scale),
        }
        negative = config.negative_prompt if config.negative_prompt is not None else self.default_negative_prompt
        if config.cfg_scale > 1 and negative is not None:
            kwargs["negative_prompt"] = [negative] * batch_size
        tokenizer = getattr(self.pipeline, self.t5_tokenizer_name, None) if self.t5_tokenizer_name else None
        if tokenizer is not None:
            kwargs["max_sequence_length"] = self.t5_sequence_length(tokenizer)
        return kwargs

    def pipeline_guidance_scale(self, cfg_scale: float) -> float:
        """The value of the pipeline's `cfg_call_argument` that samples with `DDRLConfig.cfg_scale` w, where the
        guided output is ε_∅ + w (ε_c − ε_∅). Most pipelines take w itself; those that compute ε_c + g (ε_c − ε_∅)
        (Z-Image, Cosmos) take g = w − 1."""
        return cfg_scale

    def negative_prompt_call(self, negative: str) -> str:
        """How a pipeline call takes the negative prompt `negative` (a Python expression), for the model card's usage
        line: `negative_prompt=...` unless the pipeline takes embeddings only (FLUX.2 [klein])."""
        return f"negative_prompt={negative}"

    def combine_guidance(self, cond_output: torch.Tensor, uncond_output: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided output of the two branches, float32, as the pipeline combines them: ε_∅ + w (ε_c − ε_∅) by
        default (`ddrl_trl.core.combine_guidance`); a family whose pipeline does more (Qwen-Image's norm rescale)
        overrides it. Outputs are in the unpacked latent layout of `latent_shape`."""
        return combine_guidance(cond_output, uncond_output, scale)

    def t5_sequence_length(self, tokenizer) -> int:
        """`max_sequence_length` capped by the T5 tokenizer's `model_max_length`."""
        return min(self.max_sequence_length, tokenizer.model_max_length)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network DDRL trains."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    @abstractmethod
    def default_resolution(self) -> int:
        """The pixel resolution the denoiser was configured for."""

    @property
    def vae_scale_factor(self) -> int:
        """How much the VAE downsamples (2 per extra block of an `AutoencoderKL`)."""
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    @abstractmethod
    def denoiser_downsampling(self) -> int:
        """How much the denoiser itself downsamples latents (UNet levels, or a transformer's patch size)."""

    def validate_resolution(self, resolution: int) -> None:
        """Raise `ValueError`, naming valid sizes, if `resolution` does not fit the VAE and denoiser."""
        multiple = self.vae_scale_factor * self.denoiser_downsampling
        if resolution <= 0 or resolution % multiple:
            lower = max(multiple, resolution // multiple * multiple)
            raise ValueError(
                f"resolution={resolution} is not supported by this pipeline: its VAE downsamples by "
                f"{self.vae_scale_factor} and its denoiser by {self.denoiser_downsampling}, so the resolution must be "
                f"a positive multiple of {multiple} (e.g. {lower} or {lower + multiple}). Set `resolution` in "
                "DDRLConfig."
            )

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one latent sample (no batch dimension) at `resolution`."""
        side = resolution // self.vae_scale_factor
        return (self.denoiser.config.in_channels, side, side)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that are used but never trained (VAE, text encoders)."""
        modules = (getattr(self.pipeline, name, None) for name in self.frozen_module_names)
        return [m for m in modules if m is not None]

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning for `prompts`, one row each (the conditional branch)."""

    def encode_unconditional(self, negative_prompts: list[str] | None, count: int) -> Conditioning:
        """Conditioning of the unconditional branch of classifier-free guidance, `count` rows: the encoded
        `negative_prompts`, or with None what the pipeline uses when given no negative prompt (the empty prompt;
        overridden where a pipeline differs, e.g. SDXL's zeros) — also the null conditioning of the data term's
        prompt dropout. Tensors of the same shapes as `encode_prompts`'."""
        if negative_prompts is None:
            negative_prompts = [self.default_negative_prompt or ""] * count
        return self.encode_prompts(negative_prompts)

    def encode_null(self, count: int) -> Conditioning:
        """The conditioning the data term's prompt dropout replaces prompts with, `count` rows: what the family's
        training drops captions to. By default the unconditional branch's with no negative prompt (the empty
        prompt); overridden where training uses something else (Cosmos: zero embeddings)."""
        return self.encode_unconditional(None, count)

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        denoiser: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """One denoiser forward: the model output (ε, v or velocity) for `latents` at `timesteps` `(B,)`.

        `denoiser` overrides `self.denoiser`, e.g. with its DDP-wrapped version during training, or a frozen copy.
        """

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of images `pixels` `(B, 3, H, W)` in [−1, 1]: the VAE posterior mean, shifted and scaled as the
        pipeline does (`(z − shift_factor) · scaling_factor`), float32. Deterministic, so the cache is exact."""
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents.float() - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)`, float32 in [0, 1], of `latents` (the inverse of `encode_images`' scaling)."""
        vae = self.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents / vae.config.scaling_factor + shift
        images = vae.decode(latents.to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @abstractmethod
    def make_sampler(self, config, device: torch.device):
        """The family's SDE sampler with exact log-probs (e.g. `DDIMSDESampler`), set up from a `DDRLConfig`."""

    def save_lora_weights(
        self, output_dir: str, lora_state_dict: dict[str, torch.Tensor], adapter_metadata: dict | None = None
    ) -> None:
        """Write `pytorch_lora_weights.safetensors` that `pipeline.load_lora_weights(output_dir)` reloads.

        `lora_state_dict` comes straight from `get_peft_model_state_dict`: the pipeline's own LoRA mixin writes it
        under `unet.` / `transformer.`. It is deliberately not passed through `convert_state_dict_to_diffusers`,
        which renames only some transformer keys, so the reload would silently drop part of the adapter.
        `adapter_metadata` (the `LoraConfig` as a dict) goes into the file's header: without it `load_lora_weights`
        assumes `lora_alpha == r` and no rank/alpha patterns, and reloads any other LoRA at the wrong strength.
        """
        metadata = {f"{self.denoiser_name}_lora_adapter_metadata": adapter_metadata} if adapter_metadata else {}
        type(self.pipeline).save_lora_weights(
            output_dir, **{f"{self.denoiser_name}_lora_layers": lora_state_dict}, **metadata, safe_serialization=True
        )

    def save_denoiser(self, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the full denoiser in diffusers format under `output_dir/<denoiser_name>` (`from_pretrained` reloads
        it). `state_dict`: weights gathered from shards (FSDP / DeepSpeed ZeRO-3), written as the one safetensors file
        `save_pretrained` would write."""
        folder = os.path.join(output_dir, self.denoiser_name)
        if state_dict is None:
            self.denoiser.save_pretrained(folder, safe_serialization=True)
            return
        os.makedirs(folder, exist_ok=True)
        self.denoiser.save_config(folder)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
