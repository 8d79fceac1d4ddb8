"""Qwen-Image: a `QwenImageTransformer2DModel` rectified-flow MMDiT on packed latents, sampled by the Flow-GRPO SDE.

What is Qwen-Image-specific, and lives only here (diffusers 0.42.1, pipelines/qwenimage/pipeline_qwenimage.py):
- Latents stay `(B, C, H, W)` everywhere else. The VAE is a causal video VAE: it reads and writes `(B, C, 1, H, W)`,
  and its latents are normalised per channel, (z − latents_mean) / latents_std (pipeline lines 705-714). `predict`
  packs 2×2 patches into tokens with the pipeline's `_pack_latents` and passes `img_shapes = (1, H/2, W/2)` for RoPE
  (line 595); the transformer takes t / 1000 (line 647) and predicts the velocity ε − x0 (no sign change).
- The prompt is wrapped in a chat template with a fixed system prompt, encoded by Qwen2.5-VL, and its first 34
  tokens (the template prefix) are dropped (lines 174-223). The pipeline pads the embeddings only to the longest
  prompt of its batch and drops the mask when nothing is padded; here they are zero-padded to `max_sequence_length`
  (the pipeline's cut, line 255) with a mask of valid tokens, so rows of different prompts concatenate. Padded text
  tokens are masked out of the joint attention and sit after the valid ones, so the valid tokens keep their RoPE
  positions: the transformer's output is that of the unpadded call (to float rounding).
- The timestep shift depends on the image size: `mu` is linear in the number of image tokens (`image_token_shift_mu`;
  Qwen's config: exponential shift, max_shift 0.9 at 8192 tokens, stretched to end at shift_terminal 0.02), base
  sigmas linspace(1, 1/T, T).
- Classifier-free guidance is diffusers' `true_cfg_scale` with a negative prompt (none: no guidance; the model card
  uses " "), and the guided output is RESCALED to the conditional output's norm per token (lines 668-672):
      comb = u + w (c − u);   guided = comb · ‖c‖ / ‖comb‖   (norms over each packed token's C·4 channels)
  `combine_guidance` below implements it (`ddrl_trl.core.rescale_to_conditional_norm`).
The data term is diffusers' `train_dreambooth_lora_qwen_image.py`: x_t = (1 − t) x0 + t ε, target ε − x0, unit
weighting by default (its timesteps are uniform and unshifted; docs/adapters.md).
"""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline

from ..core.guidance import combine_guidance, rescale_to_conditional_norm
from .base import Conditioning, PipelineAdapter
from .flux import FluxAdapter


class QwenImageAdapter(PipelineAdapter):
    """Adapter for `QwenImagePipeline` (Qwen-Image text-to-image) and its subclasses."""

    pipeline_classes = (QwenImagePipeline,)
    script_family = "qwenimage"
    denoiser_name = "transformer"
    frozen_module_names = ("vae", "text_encoder")
    #: Rows are padded to this length (the pipeline pads to its batch's longest prompt, cut at its default 512): a
    #: prompt of up to 128 tokens is encoded and sampled exactly as the pipeline does, and each forward carries
    #: 384 fewer padding tokens than at 512. Raise `max_sequence_length` for longer prompts.
    default_max_sequence_length = 128
    #: The pipeline refuses `max_sequence_length` > 1024 (`check_inputs`).
    max_supported_sequence_length = 1024

    def configure(self, config) -> None:
        super().configure(config)
        if self.max_sequence_length > self.max_supported_sequence_length:
            raise ValueError(
                f"max_sequence_length={self.max_sequence_length}: QwenImagePipeline encodes at most "
                f"{self.max_supported_sequence_length} prompt tokens; set max_sequence_length <= 1024."
            )

    cfg_call_argument = "true_cfg_scale"
    default_negative_prompt = " "  # the pipeline guides only when given a negative prompt; Qwen-Image's card uses " "

    @property
    def sequence_length(self) -> int:
        return min(self.max_sequence_length, self.max_supported_sequence_length)

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        """As the base, with the prompt-embedding length."""
        return {**super().pipeline_call_kwargs(config, batch_size), "max_sequence_length": self.sequence_length}

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)  # 2 ** len(vae.temperal_downsample) (pipeline line 170)

    @property
    def denoiser_downsampling(self) -> int:
        return 2  # the pipeline's 2×2 packing (`_pack_latents`)

    @property
    def default_resolution(self) -> int:
        return int(self.pipeline.default_sample_size) * self.vae_scale_factor  # 128 · 8 = 1024

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        side = resolution // self.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        length = self.sequence_length
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts, device=self.denoiser.device, max_sequence_length=length
        )
        batch, tokens, _ = embeds.shape
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(batch, tokens, dtype=torch.long, device=embeds.device)
        # Zero-pad to the fixed length, as the training script's `_pad_prompt_embedding_pair` does.
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, length - tokens))
        mask = torch.nn.functional.pad(mask, (0, length - tokens))
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def encode_null(self, count: int) -> Conditioning:
        """The empty prompt, the null conditioning of the other families, for the data term's prompt dropout (not
        the guided branch's negative prompt " ", which is the model card's sampling choice; diffusers' Qwen-Image
        training script has no caption dropout to follow)."""
        return self.encode_prompts([""] * count)

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        batch, channels, height, width = latents.shape
        dtype = self.denoiser.dtype
        packed = QwenImagePipeline._pack_latents(latents.to(dtype), batch, channels, height, width)
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(dtype) / 1000,  # as the pipeline: t.to(latents.dtype) / 1000
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        return self._unpack(output, height, width)

    def _unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        scale = self.vae_scale_factor
        return QwenImagePipeline._unpack_latents(packed, height * scale, width * scale, scale)[:, :, 0]

    def combine_guidance(self, cond_output: torch.Tensor, uncond_output: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's true CFG, float32: u + w (c − u), rescaled per packed token to the norm of c (lines
        668-672). Outputs are unpacked `(B, C, H, W)`; a token's norm is over its C channels × 2×2 pixels."""
        batch, channels, height, width = cond_output.shape
        cond = QwenImagePipeline._pack_latents(cond_output.float(), batch, channels, height, width)
        uncond = QwenImagePipeline._pack_latents(uncond_output.float(), batch, channels, height, width)
        return self._unpack(rescale_to_conditional_norm(combine_guidance(cond, uncond, scale), cond), height, width)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean and the pipeline's `latents_std` = 1 / std, shaped `(1, C, 1, 1)`."""
        config = self.pipeline.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents `(B, C, H/8, W/8)` of images `pixels` `(B, 3, H, W)` in [−1, 1]: the VAE posterior mean of the
        one-frame video, normalised as the training script does, (z − mean) · (1 / std), float32."""
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)[:, :, None]).latent_dist.mean[:, :, 0]
        mean, inv_std = self._latent_stats(latents.float())
        return (latents.float() - mean) * inv_std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)`, float32 in [0, 1], as the pipeline decodes: z / (1 / std) + mean, one frame."""
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype)
        mean, inv_std = self._latent_stats(latents)
        images = vae.decode((latents / inv_std + mean)[:, :, None], return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # Qwen-Image samples as FLUX.1 does (pipeline lines 596-606): base sigmas linspace(1, 1/T, T) shifted by a `mu`
    # linear in the number of 2×2-packed image tokens; only the scheduler config differs.
    timestep_shift_mu = FluxAdapter.timestep_shift_mu
    make_sampler = FluxAdapter.make_sampler
