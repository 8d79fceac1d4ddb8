"""FLUX.2: a `Flux2Transformer2DModel` rectified-flow denoiser on patchified, batch-normalised latents, sampled by the
Flow-GRPO SDE. `Flux2Adapter` serves `Flux2Pipeline` (FLUX.2 [dev]), `Flux2KleinAdapter` `Flux2KleinPipeline`
(FLUX.2 [klein]); they differ only in the text encoder's layers and in guidance.

What is FLUX.2-specific, and lives only here (line numbers: diffusers 0.42.1, pipelines/flux2/pipeline_flux2.py):
- Latent space. The VAE's 32-channel latents are patchified 2×2 into 128 channels (`_patchify_latents`, l.457) and
  normalised by the VAE's batch-norm running statistics, (z − bn.running_mean) / √(bn.running_var + eps)
  (`_encode_vae_image`, l.613-617; undone before decoding, l.1019-1024). The trainer's latents are these
  `(128, H/16, W/16)` tensors: the pipeline's own 4-D `latents=` input. `predict` flattens them row-major into
  tokens (`_pack_latents`, l.473) and folds the output back (what `_unpack_latents_with_ids` does for row-major ids).
- Position ids are 4-D (t, h, w, l): image tokens (0, row, col, 0) (`_prepare_latent_ids`, l.375), text tokens
  (0, 0, 0, k) (`_prepare_text_ids`, l.356); rebuilt here, so the conditioning is the prompt embeddings alone.
- Prompts: the chat-templated prompt through the text encoder, hidden states of three layers stacked per token
  (Mistral-Small-3.x (10, 20, 30) → 3 × 5120; Qwen3 (9, 18, 27)), padded to `max_sequence_length` (512); the
  padding mask is used inside the text encoder only — the transformer attends to every position.
- The transformer takes t / 1000 (it multiplies by 1000 again, transformer_flux2.py l.1284) and predicts the
  velocity ε − x0 (scheduler step x + (σ' − σ) v). FLUX.2 [dev] is guidance-distilled: `DDRLConfig.guidance_scale`
  goes to its guidance embedding in every forward (the pipeline's `guidance_scale`, l.951), and it has no
  unconditional branch. FLUX.2 [klein] base models have true CFG (`guidance_scale` of `Flux2KleinPipeline`,
  uncond = the empty prompt, plain ε_∅ + w (ε_c − ε_∅)); step-distilled klein (`is_distilled`) has none.
- The schedule: base sigmas linspace(1, 1/T, T) shifted by FLUX.2's empirical `mu = compute_empirical_mu(image
  tokens, T)` (l.159, 935-946), which depends on the step count as well as the image size.
The data term is diffusers' train_dreambooth_lora_flux2*.py recipe: x_t = (1 − t) x0 + t ε on the normalised
latents, target ε − x0, unit weighting.
"""

from __future__ import annotations

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from ..samplers import FlowSDESampler
from .base import Conditioning, PipelineAdapter
from .flux import DistilledGuidance, shifted_base_sigmas_sampler
from .mixins import NormalisedLatents, SingleTextEncoderAdapter


class Flux2Adapter(DistilledGuidance, NormalisedLatents, SingleTextEncoderAdapter):
    """Adapter for `Flux2Pipeline` (FLUX.2 [dev]) and its subclasses."""

    pipeline_classes = (Flux2Pipeline,)
    script_family = "flux2"
    # The prompt length the text encoder pads to, capped by its tokenizer's (a Mistral / Qwen tokenizer here).
    default_max_sequence_length = 512  # Flux2Pipeline.__call__'s max_sequence_length
    default_guidance_scale = 4.0  # Flux2Pipeline.__call__'s default; `configure` takes DDRLConfig.guidance_scale
    #: Text-encoder hidden states stacked into the prompt embedding (`__call__`'s `text_encoder_out_layers`).
    text_encoder_out_layers: tuple[int, ...] = (10, 20, 30)
    supports_cfg = False  # guidance-distilled: the pipeline has no unconditional branch
    cfg_call_argument = "guidance_scale"  # overwritten by the distilled guidance value in `pipeline_call_kwargs`

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        """As the base, with the distilled guidance value as `guidance_scale` and the stacked layers."""
        kwargs = super().pipeline_call_kwargs(config, batch_size)
        return {**kwargs, "text_encoder_out_layers": self.text_encoder_out_layers}

    @property
    def default_lora_target_modules(self) -> tuple[str, ...]:
        """diffusers' train_dreambooth_lora_flux2.py default: the double blocks' image attention, the single blocks'
        fused QKV+MLP input and their output (named one by one: in double blocks `to_out` is a ModuleList)."""
        singles = len(self.denoiser.single_transformer_blocks)
        outs = (f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles))
        return ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", *outs)

    @property
    def denoiser_downsampling(self) -> int:
        return 2 * int(self.denoiser.config.patch_size)  # the 2×2 patchify of VAE latents

    @property
    def default_resolution(self) -> int:
        return int(self.pipeline.default_sample_size) * self.vae_scale_factor  # 1024

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        side = resolution // (self.vae_scale_factor * self.denoiser_downsampling)
        return (self.denoiser.config.in_channels, side, side)

    def t5_sequence_length(self, tokenizer) -> int:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # FLUX.2 [dev]'s is a PixtralProcessor
        return min(self.max_sequence_length, tokenizer.model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.denoiser.device,
            max_sequence_length=self.t5_sequence_length(self.pipeline.tokenizer),
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"encoder_hidden_states": embeds}

    def _guidance(self, batch: int, device) -> torch.Tensor | None:
        # Flux2Pipeline passes it always (l.951-952); a transformer without the embedding ignores it.
        return torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        batch, channels, height, width = latents.shape
        dtype, device = self.denoiser.dtype, latents.device
        embeds = cond["encoder_hidden_states"]
        image_ids, text_ids = self._position_ids(height, width, embeds.shape[1], device)
        output = denoiser(
            hidden_states=Flux2Pipeline._pack_latents(latents.to(dtype)),  # (B, h·w, C), row-major
            timestep=timesteps.to(dtype) / 1000,  # as the pipeline: t.to(latents.dtype) / 1000
            guidance=self._guidance(batch, device),
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return output.transpose(1, 2).reshape(batch, channels, height, width)

    def _position_ids(self, height: int, width: int, text_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (t, h, w, l) ids of the image and text tokens, as the pipeline builds them (one row: the transformer
        reads row 0 only), once per shape."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            image_ids = Flux2Pipeline._prepare_latent_ids(torch.empty(1, 1, height, width))[0]
            text_ids = Flux2Pipeline._prepare_text_ids(torch.empty(1, text_tokens, 1))[0]
            return image_ids.to(device), text_ids.to(device)

        return self._cached_ids((height, width, text_tokens, device), build)

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE batch norm's running mean and √(running var + eps), `(1, 128, 1, 1)` float32."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps).to(like.device)
        return mean, std

    _latent_stats = _bn_stats  # what `NormalisedLatents` normalises by: (z − μ_bn) / σ_bn

    # `encode_images` / `decode_latents` (`NormalisedLatents`): normalised patchified latents of images in [−1, 1],
    # (z − μ_bn) / σ_bn, as `_encode_vae_image` and the training scripts do; × σ_bn + μ_bn to decode (l.1019-1028).
    def _raw_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior mode of images `pixels` in [−1, 1], patchified, float32."""
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        return Flux2Pipeline._patchify_latents(latents.float())

    def _raw_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of patchified, unnormalised latents: unpatchified, decoded."""
        vae = self.pipeline.vae
        images = vae.decode(Flux2Pipeline._unpatchify_latents(latents).to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def timestep_shift_mu(self, num_inference_steps: int) -> float:
        """FLUX.2's empirical mu: from the image token count and the number of steps (pipeline_flux2.py l.159)."""
        side = (self.resolution or self.default_resolution) // (self.vae_scale_factor * self.denoiser_downsampling)
        return compute_empirical_mu(image_seq_len=side * side, num_steps=num_inference_steps)

    def make_sampler(self, config, device: torch.device) -> FlowSDESampler:
        mu = self.timestep_shift_mu(config.num_inference_steps)
        return shifted_base_sigmas_sampler(self, config, device, mu=mu)


class Flux2KleinAdapter(Flux2Adapter):
    """Adapter for `Flux2KleinPipeline` (FLUX.2 [klein] 4B / 9B, base and step-distilled).

    Qwen3 prompt embeddings from layers (9, 18, 27); no guidance embedding (the pipeline passes `guidance=None`,
    pipeline_flux2_klein.py l.854). Base models (`is_distilled=False`) have true CFG, `guidance_scale` > 1 with the
    empty prompt as the unconditional branch (l.749-760, 864-877); the pipeline takes no negative prompt text, only
    `negative_prompt_embeds`. Step-distilled klein ignores guidance (l.596), so it refuses `cfg_scale` > 1 here."""

    pipeline_classes = (Flux2KleinPipeline,)
    script_family = "flux2-klein"
    text_encoder_out_layers = (9, 18, 27)
    cfg_call_argument = "guidance_scale"

    @property
    def supports_cfg(self) -> bool:
        return not self.pipeline.config.get("is_distilled", False)

    def configure(self, config) -> None:
        PipelineAdapter.configure(self, config)  # no guidance embedding to configure

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        """As the base (`guidance_scale` = cfg_scale); a negative prompt goes in as `negative_prompt_embeds`."""
        kwargs = PipelineAdapter.pipeline_call_kwargs(self, config, batch_size)
        negative = kwargs.pop("negative_prompt", None)
        if negative is not None:
            kwargs["negative_prompt_embeds"] = self.encode_prompts(negative)["encoder_hidden_states"]
        return {**kwargs, "text_encoder_out_layers": self.text_encoder_out_layers}

    def negative_prompt_call(self, negative: str) -> str:
        return f"negative_prompt_embeds=pipe.encode_prompt({negative})[0]"

    def _guidance(self, batch: int, device) -> None:
        return None
