"""`ddrl-trl train` and `examples/train_*.py`: DDRL from the command line, the way TRL's `trl grpo` runs.

    ddrl-trl train --family sd3 --dataset_name <paired prompt/image data> --reward_funcs <reward> --output_dir out
    accelerate launch examples/train_sd3.py --config ddrl.yaml

`main` reads top to bottom as TRL's `scripts/grpo.py`: checks → data → `DDRLTrainer(...)` →
`train(resume_from_checkpoint=...)` → `save_model` → `push_to_hub`. Arguments are parsed by `trl.TrlParser` from
`ScriptArguments` (dataset), `DDRLConfig` (training), `ModelConfig` (model and LoRA) and `RewardArguments`, over the
model family's defaults (`FAMILY_DEFAULTS`); a YAML `--config` overrides those and command-line flags override both.

- `--reward_funcs` is required (there is no safe default reward).
- `--resume_from_checkpoint` takes a checkpoint folder, or `true` / `latest` for the newest one in `--output_dir`.
- A new run refuses an `--output_dir` holding another run's work (unless `--overwrite_output_dir`), and every flag
  that has no meaning for a diffusion pipeline (`--load_in_4bit`, `--dataset_streaming`, ...) is refused rather than
  ignored — all before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml
from datasets import Dataset, load_dataset, load_from_disk
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from .adapters import adapter_class
from .config import DDRLConfig
from .errors import UsageError
from .resume import check_output_dir_free, check_output_dir_writable
from .rewards import REWARD_SPEC_HELP
from .trainer import DDRLTrainer

#: What every family but `sd` shares: a LoRA (r 32, α 64, lr 1e-4) trained in bf16 with gradient checkpointing, on
#: groups of 8 rollouts of 20 steps, 8 rollouts per device, at 512 px.
_BF16_LORA = dict(
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
#: `ddrl-trl train --family`. `sd` (SD 1.x / 2.x / XL) adds none: name the model and choose LoRA or not yourself.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd": {},
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
#: Flags of TRL's argument classes that mean nothing for a diffusion pipeline, with their only accepted value.
UNSUPPORTED_FLAGS = {
    "attn_implementation": None,
    "load_in_8bit": False,
    "load_in_4bit": False,
    "use_bnb_nested_quant": False,
    "bnb_4bit_quant_storage": None,
    "lora_target_parameters": None,
    "lora_modules_to_save": None,
    "dataset_streaming": False,
    "ignore_bias_buffers": False,
}


@dataclass
class RewardArguments:
    """Which rewards to train on, and which only to evaluate with."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Required. One or more rewards, each {REWARD_SPEC_HELP}. Weigh several with --reward_weights."
        },
    )
    eval_reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Rewards not trained on that score the validation samples (--validation_prompts), logged as "
            "eval_rewards/<name>; same forms as --reward_funcs."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})


def make_parser(family: str = "sd", prog: str | None = None) -> TrlParser:
    """The argument parser of the scripts, with `family`'s defaults (`FAMILY_DEFAULTS`)."""
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"Unknown model family {family!r}: use one of {sorted(FAMILY_DEFAULTS)}.")
    parser = TrlParser((ScriptArguments, DDRLConfig, ModelConfig, RewardArguments), prog=prog)
    parser.set_defaults(**FAMILY_DEFAULTS[family])
    return parser


def main(
    script_args: ScriptArguments, training_args: DDRLConfig, model_args: ModelConfig, reward_args: RewardArguments
) -> DDRLTrainer:
    """Train with DDRL from parsed arguments, resume if asked, save, and push to the Hub if asked."""
    resume = resume_argument(training_args.resume_from_checkpoint)
    check_arguments(script_args, training_args, model_args, reward_args, resume)  # before loading anything
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        **(training_args.model_init_kwargs or {}),
    }
    train_dataset, eval_dataset = load_data(script_args, reward_args.max_train_samples)
    trainer = DDRLTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        peft_config=lora_config(model_args),
        eval_reward_funcs=reward_args.eval_reward_funcs,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: `true` / `latest` → True (the newest checkpoint in
    `--output_dir`), `false` / `none` / empty → None, anything else a checkpoint folder."""
    if value is None or isinstance(value, bool):
        return value or None
    if value.strip().lower() in ("true", "latest", "yes", "1"):
        return True
    if value.strip().lower() in ("false", "none", "no", "0", ""):
        return None
    return value


def check_arguments(
    script_args: ScriptArguments,
    training_args: DDRLConfig,
    model_args: ModelConfig,
    reward_args: RewardArguments,
    resume: str | bool | None,
) -> None:
    """What can be checked before loading the model and data: a reward is named, no flag would be ignored, and
    `output_dir` may be used."""
    if not reward_args.reward_funcs:
        raise ValueError(
            f"--reward_funcs is required: name the reward(s) to train on, each {REWARD_SPEC_HELP}. There is no "
            "default: a reward chosen by accident is what RL optimises (the built-in 'brightness' trains toward "
            "white images)."
        )
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: a diffusers pipeline's Hub id or local folder.")
    ignored = {
        name: getattr(args, name)
        for args in (script_args, model_args)
        for name, accepted in UNSUPPORTED_FLAGS.items()
        if hasattr(args, name) and getattr(args, name) != accepted
    }
    if ignored:
        raise ValueError(
            f"{', '.join(f'--{name} {value}' for name, value in ignored.items())}: not supported for diffusion "
            f"pipelines (quantised loading, attention backends, extra LoRA modules, streamed datasets). Drop them."
        )
    if model_args.dtype not in (None, "auto", "float32"):
        raise ValueError(
            f"--dtype {model_args.dtype}: the trainer chooses dtypes itself (float32 trained weights, the frozen "
            "parts in bf16/fp16 under --bf16 / --fp16). Use --bf16 or --fp16 instead."
        )
    if training_args.should_save:
        check_output_dir_writable(training_args.output_dir)
    check_output_dir_free(training_args, resume)


def lora_config(model_args: ModelConfig):
    """`trl.get_peft_config`, for a diffusers denoiser (no transformers task type), or None without `--use_peft`."""
    config = get_peft_config(model_args)
    if config is not None:
        config.task_type = None
    return config


def load_data(script_args: ScriptArguments, max_train_samples: int | None = None) -> tuple[Dataset, Dataset | None]:
    """The train split and, if present, the test split of `--dataset_name`: a Hub id or a `save_to_disk` folder."""
    name = script_args.dataset_name
    if name is None:
        raise ValueError("--dataset_name is required: a Hub dataset id or a folder saved with Dataset.save_to_disk.")
    saved = os.path.isdir(name) and (
        os.path.isfile(os.path.join(name, "dataset_info.json"))
        or os.path.isfile(os.path.join(name, "dataset_dict.json"))
    )
    data = load_from_disk(name) if saved else load_dataset(name, script_args.dataset_config)
    train, test = data, None
    if hasattr(data, "keys"):  # a DatasetDict
        train = data[script_args.dataset_train_split]
        test = data[script_args.dataset_test_split] if script_args.dataset_test_split in data else None
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    return train, test


def infer_family(model_name_or_path: str, revision: str | None = None) -> str:
    """The model family of a pipeline folder or Hub id (at `revision`: Cosmos keeps its diffusers files on a branch),
    from its `model_index.json` (the pipeline class's adapter's `script_family`)."""
    if os.path.isdir(model_name_or_path):
        path = os.path.join(model_name_or_path, "model_index.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(model_name_or_path, "model_index.json", revision=revision)
        except Exception as err:  # noqa: BLE001 — offline, unknown repo, no such file: all mean "cannot tell"
            raise ValueError(
                f"Cannot read {model_name_or_path}'s model_index.json to infer its family ({err}): pass "
                f"--family ({', '.join(FAMILY_DEFAULTS)})."
            ) from err
    with open(path, encoding="utf-8") as file:
        pipeline = json.load(file).get("_class_name")
    import diffusers

    adapter = adapter_class(getattr(diffusers, pipeline, type(None)))
    if adapter is None or adapter.script_family is None:
        raise ValueError(
            f"{model_name_or_path} is a {pipeline}, which `ddrl-trl train` has no family for: pass "
            f"--family ({', '.join(FAMILY_DEFAULTS)}) or use DDRLTrainer from Python."
        )
    return adapter.script_family


def train_command(argv: list[str]) -> DDRLTrainer:
    """`ddrl-trl train [--family F] ...`: the family from `--family`, or from the pipeline `--model_name_or_path`
    (on the command line or in `--config`) names; then `main` with that family's defaults. Bad arguments raise
    `UsageError` before anything loads; errors during training keep their own type and traceback."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--family", choices=sorted(FAMILY_DEFAULTS))
    first.add_argument("--model_name_or_path")
    first.add_argument("--model_revision")
    first.add_argument("--config")
    known, rest = first.parse_known_args(argv)
    if any(arg in ("-h", "--help") for arg in rest):
        print(TRAIN_HELP)
        make_parser(known.family or "sd", prog="ddrl-trl train").parse_args_and_config(args=["--help"])
    try:
        model, revision = known.model_name_or_path, known.model_revision
        if known.config and (model is None or revision is None):
            with open(known.config, encoding="utf-8") as file:
                from_config = yaml.safe_load(file) or {}
            model = model or from_config.get("model_name_or_path")
            revision = revision or from_config.get("model_revision")
        family = known.family or (infer_family(model, revision) if model else None)
        if family is None:
            raise ValueError(
                f"Name the model: --model_name_or_path (its family is inferred), or --family "
                f"({', '.join(sorted(FAMILY_DEFAULTS))}) for its default model."
            )
        argv = [*rest, *(["--config", known.config] if known.config else [])]
        argv += ["--model_name_or_path", known.model_name_or_path] if known.model_name_or_path else []
        parsed = make_parser(family, prog="ddrl-trl train").parse_args_and_config(args=argv)
        check_arguments(*parsed, resume_argument(parsed[1].resume_from_checkpoint))
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from err
    return main(*parsed)


TRAIN_HELP = f"""usage: ddrl-trl train [--family {{{",".join(sorted(FAMILY_DEFAULTS))}}}] <arguments below>

DDRL training with TRL-style arguments, as examples/train_*.py.

  --family {{{",".join(sorted(FAMILY_DEFAULTS))}}}
                        the model family whose defaults apply (ddrl_trl.scripts.FAMILY_DEFAULTS); by default
                        inferred from --model_name_or_path's model_index.json (here or in --config)
"""


if __name__ == "__main__":
    train_command(sys.argv[1:])
