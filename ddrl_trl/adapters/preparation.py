"""Getting a pipeline ready to train: frozen parts placed and cast, the denoiser given a LoRA or float32 master
weights, gradient checkpointing wired to diffusers, dropout off. `DDRLTrainer` calls `prepare_for_training` once."""

from __future__ import annotations

import copy
import json
import os

import torch
from diffusers.configuration_utils import FrozenDict
from peft import LoraConfig
from trl.trainer.utils import disable_dropout_in_model

from . import PipelineAdapter


def frozen_dtype(args) -> torch.dtype:
    """The dtype of everything that is not trained: bf16 / fp16 under mixed precision, else float32."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def load_pipeline(name_or_path: str | os.PathLike, args=None, device: torch.device | str | None = None):
    """The diffusers pipeline at a Hub id or local folder, loaded as `DDRLTrainer` loads its model: in the frozen
    parts' dtype (`frozen_dtype`) with `args.model_init_kwargs` (revision, variant, ...); float32 without `args`.
    Moved to `device` if given (the trainer places the parts itself: `prepare_for_training`)."""
    from diffusers import DiffusionPipeline

    dtype = frozen_dtype(args) if args is not None else torch.float32
    kwargs = dict(args.model_init_kwargs or {}) if args is not None else {}
    pipeline = DiffusionPipeline.from_pretrained(os.fspath(name_or_path), dtype=dtype, **kwargs)
    return pipeline.to(device) if device is not None else pipeline


def prepare_for_training(adapter: PipelineAdapter, args, peft_config: LoraConfig | None) -> bool:
    """Prepare `adapter`'s pipeline for DDRL on `args.device`; returns whether a LoRA is trained.

    - VAE and text encoders: frozen, eval mode, in the training dtype (`frozen_dtype`).
    - LoRA (`peft_config`): the base denoiser frozen in that dtype, the adapter injected with a random init that
      depends on `args.seed` alone (not on the global RNG state), its weights kept in float32 (master weights).
      A `LoraConfig` without `target_modules` gets the family's default modules; the caller's config is not changed.
    - Full fine-tuning: the whole denoiser trainable in float32 (bf16/fp16 run through autocast).
    - Gradient checkpointing (`args.gradient_checkpointing`, with `gradient_checkpointing_kwargs`): switched on with
      diffusers' `enable_gradient_checkpointing`, and the denoiser answers the `Trainer`'s own call to switch it on,
      so the arguments stay as the user gave them.
    - Dropout off everywhere in the denoiser: rollouts and the loss must see the same network (ratio = 1).
    """
    dtype, device = frozen_dtype(args), args.device

    def place(module: torch.nn.Module) -> None:
        module.to(device)
        if module.dtype != dtype:  # cast only when needed: diffusers warns on every cast
            module.to(dtype=dtype)

    for module in adapter.frozen_modules():
        module.requires_grad_(False).eval()
        place(module)
    denoiser = adapter.denoiser
    if peft_config is not None:
        peft_config = copy.deepcopy(peft_config)
        if peft_config.target_modules is None:
            peft_config.target_modules = list(adapter.default_lora_target_modules)
        denoiser.requires_grad_(False)
        place(denoiser)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            denoiser.add_adapter(peft_config)
        for param in denoiser.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    else:
        denoiser.requires_grad_(True).to(device)
        if denoiser.dtype != torch.float32:
            denoiser.to(dtype=torch.float32)
    if args.gradient_checkpointing:  # now, so evaluation before train() sees the same model
        _enable_checkpointing(denoiser, args)
    disable_dropout_in_model(denoiser)
    make_config_tracker_friendly(denoiser)
    return peft_config is not None


def _enable_checkpointing(denoiser: torch.nn.Module, args) -> None:
    """diffusers' gradient checkpointing with the `gradient_checkpointing_kwargs` of `torch.utils.checkpoint` (e.g.
    `use_reentrant`; diffusers' own default is `use_reentrant=False`), and, for the `Trainer`'s own call, the method
    it looks for (`activation_checkpointing_enable` in transformers 5, `gradient_checkpointing_enable` in 4)."""
    kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {})
    unsupported = sorted(set(kwargs) & {"every_n_layers", "offload"})
    if unsupported:
        raise ValueError(
            f"gradient_checkpointing_kwargs {unsupported} are not supported for diffusers denoisers, which checkpoint "
            f"every block: drop them (arguments of torch.utils.checkpoint.checkpoint, like use_reentrant, are fine)."
        )
    kwargs.setdefault("use_reentrant", False)

    def checkpoint(module, *inputs):
        return torch.utils.checkpoint.checkpoint(module.__call__, *inputs, **kwargs)

    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)

    def enable_as_set(*_, **__) -> None:  # Trainer.train calls it again: already done, with the same settings
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)

    denoiser.activation_checkpointing_enable = denoiser.gradient_checkpointing_enable = enable_as_set


class TrackerFriendlyConfig(FrozenDict):
    """A diffusers config that also answers `to_dict()` / `to_json_string()`, as transformers' trackers expect.

    TensorBoard, MLflow and others log `model.config` through those methods of `PretrainedConfig`; a diffusers
    model's `FrozenDict` config lacks them and crashes `on_train_begin`.
    """

    def to_dict(self) -> dict:
        return dict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


def make_config_tracker_friendly(model: torch.nn.Module) -> None:
    """Swap `model.config` for an equal `TrackerFriendlyConfig` (still a `FrozenDict`, so diffusers is unaffected)."""
    config = getattr(model, "_internal_dict", None)
    if config is not None and not isinstance(config, TrackerFriendlyConfig):
        model._internal_dict = TrackerFriendlyConfig(config)
