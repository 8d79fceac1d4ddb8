"""The model families of `ddrl-trl train --family` and `examples/train_*.py`, with their defaults.

Kept apart from `train.py` (which imports TRL) so that `ddrl-trl --help` can list the families without loading
TRL, transformers or torch.
"""

from __future__ import annotations

from typing import Any

#: What every family shares: diffusers' LoRA dropout of 0 (TRL's `ModelConfig` defaults to 0.05, a language-model
#: habit; diffusers' training scripts train without dropout).
_COMMON: dict[str, Any] = dict(lora_dropout=0.0)
#: What every family but `sd` adds: a LoRA (r 32, α 64, lr 1e-4) trained in bf16 with gradient checkpointing, on
#: groups of 8 rollouts of 20 steps, 8 rollouts per device, at 512 px.
_BF16_LORA: dict[str, Any] = dict(
    _COMMON,
    resolution=512,
    num_inference_steps=20,
    num_generations=8,
    per_device_train_batch_size=8,
    use_peft=True,
    lora_r=32,
    lora_alpha=64,
    learning_rate=1e-4,
    bf16=True,
    gradient_checkpointing=True,
)
#: Each model family's defaults (over `DDRLConfig`'s and `ModelConfig`'s), as used by `examples/train_*.py` and
#: `ddrl-trl train --family`. `sd` (SD 1.x / 2.x / XL) adds only the LoRA dropout of 0: name the model and choose LoRA
#: or not yourself.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd": dict(_COMMON),
    "sd3": dict(_BF16_LORA, model_name_or_path="stabilityai/stable-diffusion-3.5-medium", learning_rate=3e-4),
    "flux": dict(_BF16_LORA, model_name_or_path="black-forest-labs/FLUX.1-dev", guidance_scale=3.5),
    "wan": dict(
        _BF16_LORA,
        model_name_or_path="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        resolution=480,
        num_frames=33,
        lora_alpha=32,
    ),
    # The 2025–26 DiTs (docs/adapters.md, "Supported models"): LoRA in bf16 with gradient checkpointing, rollouts
    # sampled as their pipelines sample by default (guided for the non-distilled ones, at twice the forward cost; the
    # unset data_beta then resolves to the guided anchor for that cfg_scale, `config.default_data_beta`).
    "qwenimage": dict(
        _BF16_LORA,
        model_name_or_path="Qwen/Qwen-Image",
        cfg_scale=4.0,  # the pipeline's true_cfg_scale, with Qwen-Image's negative prompt " "
    ),
    "flux2": dict(
        _BF16_LORA,
        model_name_or_path="black-forest-labs/FLUX.2-dev",
        guidance_scale=4.0,  # the distilled guidance embedding (Flux2Pipeline's default)
    ),
    "flux2-klein": dict(
        _BF16_LORA,
        model_name_or_path="black-forest-labs/FLUX.2-klein-base-4B",
        cfg_scale=4.0,  # Flux2KleinPipeline's guidance_scale (true CFG of the base models)
    ),
    "zimage": dict(
        _BF16_LORA,
        model_name_or_path="Tongyi-MAI/Z-Image",
        cfg_scale=5.0,  # guidance_scale 4, the model card's example (cfg_scale = 1 + guidance_scale)
    ),
    "sana": dict(
        _BF16_LORA,
        model_name_or_path="Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
        resolution=1024,  # the checkpoint's size: sampled at another, SanaPipeline bins it back to 1024 px
        cfg_scale=4.5,  # SanaPipeline's guidance_scale
        max_sequence_length=300,
    ),
    "cosmos": dict(
        _BF16_LORA,
        model_name_or_path="nvidia/Cosmos-Predict2.5-2B",
        model_revision="diffusers/base/post-trained",
        resolution=480,
        num_frames=33,
        # cfg_scale stays 1: the authors' DDRL runs on Cosmos roll out unguided
    ),
}

#: The families as `--family` lists them.
FAMILIES = sorted(FAMILY_DEFAULTS)
