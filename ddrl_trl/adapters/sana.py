"""SANA 1.0 / 1.5 text-to-image: a `SanaTransformer2DModel` rectified-flow denoiser on DC-AE latents.

What is SANA-specific, and lives only here (line numbers: diffusers 0.42.1 `pipelines/sana/pipeline_sana.py`):
- Conditioning is Gemma-2's last hidden state *with its attention mask*: the transformer's cross-attention masks
  the padding (`encoder_attention_mask`, l. 920), so the mask is part of the conditioning.
- Prompts are encoded with the "complex human instruction" (CHI, `__call__` default, l. 701–710): the instruction
  lines joined by "\\n" are prepended to the lower-cased prompt, tokenised to n_CHI + L − 2 tokens (l. 257–260, n_CHI
  counting `<bos>`), run through Gemma (causal: the prompt's states see the instruction), and then only `<bos>` and
  the last L − 1 positions are kept (`select_index`, l. 354 / 366–367), embeddings and mask alike. The negative
  prompt (default "", l. 285) is encoded *without* the instruction (l. 385); without it `select_index` is the
  identity, so both branches are L = `max_sequence_length` (default 300) tokens. `complex_human_instruction` on the
  adapter (None: off) must match what the pipeline is called with; `pipeline_call_kwargs` passes it.
- Classifier-free guidance is plain `uncond + w (cond − uncond)` on `guidance_scale` (l. 928–930), on when w > 1.
- The transformer takes the scheduler's timestep (σ · 1000) times `timestep_scale` (1.0 for SANA 1.0/1.5, l. 914)
  and predicts the flow velocity ε − x0 (the scheduler's `flow_prediction`: x0 = x − σ v), our convention as is.
- The Hub ships `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0 (6.0 at 4K),
  prediction_type="flow_prediction")`: `FlowSDESampler` reads its sigmas as is. Its timesteps are the sigmas · 1000
  *truncated to int64* (`scheduling_dpmsolver_multistep.py` l. 465–469, 485), so the transformer sees ⌊1000 σ⌋ while
  the step uses σ; the sampler keeps both, as the pipeline does.
- DC-AE latents are deterministic (`encode(x).latent`, no posterior) and scaled by `scaling_factor` alone, no shift
  (decode: `latents / scaling_factor`, l. 961). The DC-AE downsamples 32× and the transformer patch is 1.
- `use_resolution_binning` (on by default) snaps the requested size to an aspect-ratio bin of the model's native
  size and resizes the decoded image back (l. 809–821, 968–969): a 512-px call on a 1024-px model samples at 1024 px.
  `pipeline_call_kwargs` turns it off so pipeline calls sample at the rollouts' resolution.
The data term is diffusers' `train_dreambooth_lora_sana.py`: x_t = (1 − t) x0 + t ε, target ε − x0, unit weighting
(its default `--weighting_scheme none`).
"""

from __future__ import annotations

import inspect

import torch
from diffusers import SanaPipeline

from ..samplers import FlowSDESampler
from .base import Conditioning
from .mixins import SingleTextEncoderAdapter, TransformerConfigSize

#: SanaPipeline.__call__'s default complex human instruction.
DEFAULT_COMPLEX_HUMAN_INSTRUCTION = (
    inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
)


class SanaAdapter(TransformerConfigSize, SingleTextEncoderAdapter):
    """Adapter for `SanaPipeline` (SANA 600M/1.6B, SANA 1.5 1.6B/4.8B) and its subclasses."""

    pipeline_classes = (SanaPipeline,)
    script_family = "sana"
    default_lora_target_modules = ("to_k", "to_q", "to_v")  # train_dreambooth_lora_sana.py's default
    default_max_sequence_length = 300  # SanaPipeline.__call__'s default
    default_negative_prompt = ""  # SanaPipeline.encode_prompt's default negative prompt
    # Its one text encoder is Gemma-2, whose tokenizer caps max_sequence_length at its model_max_length.

    def __init__(self, pipeline, resolution: int | None = None):
        super().__init__(pipeline, resolution)
        #: The instruction prepended to prompts (not to negative prompts); None or [] switches it off.
        self.complex_human_instruction = list(DEFAULT_COMPLEX_HUMAN_INSTRUCTION)

    def pipeline_call_kwargs(self, config, batch_size: int) -> dict:
        return {
            **super().pipeline_call_kwargs(config, batch_size),
            "complex_human_instruction": self.complex_human_instruction,
            "use_resolution_binning": False,
        }

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)  # 2 ** (len(encoder_block_out_channels) − 1): 32 for DC-AE f32

    def _encode(self, prompts: list[str], instruction) -> Conditioning:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.denoiser.device,
            max_sequence_length=self.t5_sequence_length(self.pipeline.tokenizer),
            complex_human_instruction=instruction,
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return self._encode(prompts, self.complex_human_instruction)

    @torch.no_grad()
    def encode_unconditional(self, negative_prompts: list[str] | None, count: int) -> Conditioning:
        """The negative prompts (default "") encoded as the pipeline encodes them: without the instruction."""
        if negative_prompts is None:
            negative_prompts = [self.default_negative_prompt] * count
        return self._encode(negative_prompts, None)

    def predict(self, latents, timesteps, cond, denoiser=None) -> torch.Tensor:
        denoiser = denoiser if denoiser is not None else self.denoiser
        config, dtype = self.denoiser.config, self.denoiser.dtype
        output = denoiser(
            latents.to(dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=timesteps * config.timestep_scale,
            return_dict=False,
        )[0]
        if config.out_channels // 2 == config.in_channels:  # learned sigma (l. 933): never for SANA's 32 → 32
            output = output.chunk(2, dim=1)[0]
        return output

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """DC-AE latents of `pixels` in [−1, 1], times `scaling_factor` (as `train_dreambooth_lora_sana.py`)."""
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent
        return latents.float() * vae.config.scaling_factor

    def make_sampler(self, config, device: torch.device) -> FlowSDESampler:
        # SanaPipeline passes no sigmas: the scheduler's own flow sigmas, shifted by its flow_shift (l. 880–882).
        steps, noise_level = config.num_inference_steps, config.flow_noise_level
        return FlowSDESampler(self.pipeline.scheduler, steps, noise_level, device=device)
