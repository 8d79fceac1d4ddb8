"""The command-line arguments of `ddrl-trl train` and `examples/train_*.py`: the argument dataclasses beside TRL's
(`DDRLScriptArguments`, `RewardArguments`, `HackingMonitorArguments`), and `DDRLParser`, a `trl.TrlParser` whose
`--help` shows the flags that apply to a diffusion pipeline and whose errors are one line naming the flags.
`make_parser` builds it over a model family's defaults (`families.py`); `train.py` runs what it parses.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import yaml
from trl import ModelConfig, ScriptArguments, TrlParser

from ..errors import UsageError
from ..rewards import REWARD_SPEC_HELP
from .families import FAMILIES, FAMILY_DEFAULTS

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
#: The monitor's signals (`callbacks.SIGNALS`, repeated here so that parsing does not import transformers' callbacks).
HACKING_SIGNALS = ("loss_ratio", "eval_rewards", "diversity")


@dataclass
class DDRLScriptArguments(ScriptArguments):
    """TRL's dataset arguments, and prompt-only data with synthetic references."""

    synthetic_references_per_prompt: int | None = field(
        default=None,
        metadata={
            "help": "Train on prompts only: before training, sample N reference images per prompt with the base "
            "pipeline, as its rollouts are sampled (ddrl_trl.build_synthetic_reference_dataset), and pair them "
            "with the prompts for the data term (the paper's synthetic data). The data then need only the prompt "
            "column; a dataset that already has a reference column is refused."
        },
    )


@dataclass
class RewardArguments:
    """Which rewards to train on, and which only to evaluate with."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Required. One or more rewards, each {REWARD_SPEC_HELP}. Weigh several with --reward_weights. "
            "A module in the current folder is found as with `python -m` (`--reward_funcs mymod:f` next to mymod.py)."
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


@dataclass
class HackingMonitorArguments:
    """The reward-hacking monitor, `HackingMonitorCallback` (docs/training-runs.md), from the command line."""

    hacking_monitor: bool = field(
        default=False,
        metadata={
            "help": "Watch for reward hacking while training: evaluate every --hacking_eval_steps steps, keep the "
            "last good weights in <output_dir>/<--hacking_last_good_dir>, warn when a watched signal trips (and "
            "stop with --hacking_stop_training)."
        },
    )
    hacking_watch: list[str] = field(
        default_factory=lambda: ["loss_ratio"],
        metadata={
            "help": "The signals that decide: loss_ratio (the held-out diffusion loss over the base model's passes "
            "--hacking_threshold; needs a test split in --dataset_name), eval_rewards (an --eval_reward_funcs reward "
            "falls by more than --hacking_max_eval_reward_drop; needs --validation_prompts), diversity (the "
            "validation samples' diversity falls under --hacking_min_diversity_ratio of the base model's).",
            "choices": HACKING_SIGNALS,
        },
    )
    hacking_threshold: float = field(
        default=1.10, metadata={"help": "The loss ratio above which the run counts as hacking (the paper's 1.10)."}
    )
    hacking_eval_steps: int = field(default=50, metadata={"help": "Evaluate for the monitor every N steps."})
    hacking_stop_training: bool = field(
        default=False,
        metadata={
            "help": "Stop training when hacking is detected; the last good weights are then the run's output (and "
            "what --push_to_hub uploads)."
        },
    )
    hacking_last_good_dir: str = field(
        default="last-good",
        metadata={"help": "The folder under --output_dir where the monitor keeps the last good weights."},
    )
    hacking_max_eval_reward_drop: float = field(
        default=0.10,
        metadata={"help": "The largest fall of an evaluation reward below the base model's (0.10: a tenth)."},
    )
    hacking_min_diversity_ratio: float = field(
        default=0.5, metadata={"help": "The smallest validation diversity, as a fraction of the base model's."}
    )


# ---------------------------------------------------------------------------------------------------- the parser
#: The flags of transformers' `TrainingArguments` that `--help` shows: the common training ones. The others (and
#: TRL's language-model flags: quantisation, attention backends, NEFTune, Liger kernels, task types) still parse, as
#: in any Trainer script, but are hidden; those that would be ignored are refused (`UNSUPPORTED_FLAGS`).
TRAINING_FLAGS_SHOWN = frozenset(
    """
    output_dir overwrite_output_dir per_device_train_batch_size per_device_eval_batch_size
    gradient_accumulation_steps num_train_epochs max_steps learning_rate weight_decay adam_beta1 adam_beta2
    adam_epsilon max_grad_norm optim lr_scheduler_type lr_scheduler_kwargs warmup_steps bf16 fp16 tf32
    gradient_checkpointing gradient_checkpointing_kwargs seed data_seed use_cpu ddp_timeout logging_strategy
    logging_steps logging_first_step log_level disable_tqdm report_to run_name eval_strategy eval_steps
    eval_on_start save_strategy save_steps save_total_limit resume_from_checkpoint push_to_hub hub_model_id
    hub_private_repo hub_strategy hub_revision
    """.split()
)
#: `ModelConfig` and `ScriptArguments` flags that apply to a diffusers pipeline.
MODEL_FLAGS_SHOWN = frozenset(
    {"model_name_or_path", "model_revision", "use_peft", "lora_r", "lora_alpha", "lora_dropout"}
    | {"lora_target_modules", "use_rslora", "use_dora"}
)
DATASET_FLAGS_SHOWN = frozenset({"dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split"})
#: Help texts that say what a flag means here (TRL's are written for language models).
HELP_OVERRIDES = {
    "model_name_or_path": "The diffusers pipeline to train: a Hub id or a local folder (its model_index.json names "
    "the family).",
    "dataset_name": "Required. The training data: a Hub dataset id or a folder saved with Dataset.save_to_disk, with "
    "a prompt column and a paired reference image/video column (prompts only with "
    "--synthetic_references_per_prompt). Its --dataset_test_split split, if any, is the held-out data.",
    "dataset_config": "The dataset's configuration (load_dataset's `name`).",
    "dataset_train_split": "The training split of --dataset_name.",
    "dataset_test_split": "The held-out split of --dataset_name, if it has one (the held-out diffusion loss, "
    "--num_validation_prompts, --hacking_watch loss_ratio).",
    "model_revision": "The model's revision on the Hub: a branch, tag or commit.",
    "use_peft": "Train a LoRA (else the whole denoiser).",
    "lora_r": "LoRA rank.",
    "use_rslora": "Rank-stabilised LoRA: scaled by lora_alpha/√r instead of lora_alpha/r.",
    "use_dora": "Train a DoRA (weight-decomposed LoRA) instead of a plain LoRA.",
    "output_dir": "Where the checkpoints, the final weights, the validation grids and the logs go.",
    "max_steps": "Optimiser steps to train for; when > 0 it overrides --num_train_epochs.",
    "eval_steps": "Evaluate every N steps under --eval_strategy steps (default: --logging_steps).",
    "save_steps": "Save a checkpoint every N steps (a float in (0, 1): that fraction of the run).",
    "save_total_limit": "Keep at most N checkpoints (the oldest are deleted).",
    "gradient_checkpointing_kwargs": "Keyword arguments of gradient checkpointing (JSON), e.g. "
    "'{\"use_reentrant\": false}'.",
    "hub_private_repo": "Make the Hub repo private (default: the organisation's default).",
    "gradient_checkpointing": "Recompute activations in the backward pass to save memory (diffusers' "
    "enable_gradient_checkpointing; transformers 5 also calls it --activation_checkpointing).",
    "lora_dropout": "LoRA dropout (0, diffusers' default).",
    "lora_target_modules": "The modules the LoRA is applied to; None: the model family's default target modules "
    "(the attention projections, ddrl_trl.adapters: default_lora_target_modules).",
    "resume_from_checkpoint": "Continue an interrupted run: a checkpoint folder; `true` for the newest checkpoint-N "
    "in --output_dir; `latest` for the newest one, or a new run when there is none yet (restartable jobs). Checked "
    "before anything trains.",
}
#: Field names that are single words: translated to flags in messages only when they are ours (`flag_names`).
_SINGLE_WORD_FIELDS = frozenset({"eta", "epsilon", "resolution"})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag once in `--help`, with a short value name: `--max_steps N`, not also `--max-steps MAX_STEPS` (the
    dashed spelling still parses), so that most flags fit on one line."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        if action.metavar is not None:
            value = str(action.metavar)
        elif action.choices is not None and len(action.choices) <= 4:
            value = "{" + ",".join(map(str, action.choices)) + "}"
        elif action.nargs == "?" and action.const is True:
            value = "BOOL"
        else:
            kind = getattr(action.type, "__name__", "")  # TRL wraps `T | None` types, keeping T's name
            value = {"int": "N", "float": "X"}.get(kind, "NAME" if action.choices is not None else "VALUE")
        if action.nargs == "?":
            value = f"[{value}]"
        elif action.nargs in ("+", "*"):
            value = f"{value} [...]"
        return f"{action.option_strings[0]} {value}"


class DDRLParser(TrlParser):
    """`trl.TrlParser` whose errors are `UsageError`s naming the flags (one line from the command line, exit code 2),
    whether they come from argparse, the YAML `--config` file, or a dataclass check (`DDRLConfig.__post_init__`)."""

    def error(self, message: str):  # argparse prints usage and exits; one clear line instead
        raise UsageError(message)

    def flags(self) -> set[str]:
        return {action.dest for action in self._actions}

    def parse_args_and_config(self, args: Iterable[str] | None = None, **kwargs) -> tuple[Any, ...]:
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise UsageError("argument --config: expected a YAML file.")
            config = read_config(args[index + 1])
            unknown = [key for key in config if key not in self.flags() and key != "env"]
            if unknown:
                raise UsageError(
                    f"--config {args[index + 1]}: unknown argument(s) {', '.join(unknown)} (each key must be a flag "
                    f"name without the dashes; `--help` lists them)."
                )
        try:
            return super().parse_args_and_config(args, **kwargs)
        except UsageError:
            raise
        except ValueError as err:
            message = str(err)
            unused = re.match(r"Some specified arguments are not used by the HfArgumentParser: (.*)", message)
            if unused:
                message = f"unrecognized arguments: {' '.join(_printed_list(unused.group(1)))}"
            raise UsageError(flag_names(message, self.flags())) from err


def _printed_list(text: str) -> list[str]:
    """The strings of a printed Python list (`['--a', 'b']`), or the text itself."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return [text]
    return [str(v) for v in value] if isinstance(value, list) else [text]


def read_config(path: str) -> dict[str, Any]:
    """The YAML `--config` file as a mapping, or a `UsageError` saying what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read it ({err.strerror or err}).") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"--config {path} is not valid YAML: {problem}{where}.") from err
    if not isinstance(config, dict):
        got = "an empty file" if config is None else f"a YAML {'list' if isinstance(config, list) else 'scalar'}"
        raise UsageError(
            f"--config {path} must hold a YAML mapping of argument names to values (lines like `learning_rate: "
            f"1e-4`), got {got}."
        )
    return config


def flag_names(message: str, names: Iterable[str]) -> str:
    """`message` (written for Python users: `DDRLConfig.validation_prompts`, `num_validation_prompts=3`) with the
    argument names as the command-line flags (`--validation_prompts`). A message that already names flags is kept."""
    # "prompt_column= in DDRLConfig (--prompt_column on the command line)" → "--prompt_column"
    message = re.sub(r"\b(\w+)= in DDRLConfig \((--\1) on the command line\)", r"\2", message)
    if "--" in message:
        return message
    message = message.replace("DDRLConfig.", "")
    candidates = sorted((n for n in names if "_" in n or n in _SINGLE_WORD_FIELDS), key=len, reverse=True)
    if not candidates:
        return message
    pattern = r"(?<![\w./'\"-])(" + "|".join(map(re.escape, candidates)) + r")(?![\w])"
    return re.sub(pattern, r"--\1", message)


def make_parser(family: str = "sd", prog: str | None = None, usage: str | None = None) -> DDRLParser:
    """The argument parser of the scripts, with `family`'s defaults (`FAMILY_DEFAULTS`). Its `--help` shows the
    flags that apply to diffusion (ours and the common training ones, grouped); the rest parse but are hidden."""
    from transformers import TrainingArguments

    from ..config import DDRLConfig

    if family not in FAMILY_DEFAULTS:
        raise UsageError(f"Unknown model family {family!r}: use one of {', '.join(FAMILIES)}.")
    parser = DDRLParser(
        (DDRLScriptArguments, DDRLConfig, ModelConfig, RewardArguments, HackingMonitorArguments),
        prog=prog,
        formatter_class=_HelpFormatter,
        usage=usage or f"{prog or '%(prog)s'} [--config FILE.yaml] [--<argument> VALUE ...]",
        description=f"DDRL training of a diffusers pipeline, with the {family!r} family's defaults. Every argument "
        "can also be a key of the YAML --config file; flags on the command line win. Flags of TRL and transformers "
        "that do not apply to diffusion are not shown.",
    )
    parser.set_defaults(**FAMILY_DEFAULTS[family])
    ours = {f.name for f in fields(DDRLConfig)} - {f.name for f in fields(TrainingArguments)}
    groups = {
        "data": DATASET_FLAGS_SHOWN | {"synthetic_references_per_prompt", "max_train_samples"},
        "model and LoRA": MODEL_FLAGS_SHOWN,
        "rewards": {f.name for f in fields(RewardArguments)} - {"max_train_samples"},
        "DDRL (DDRLConfig)": ours,
        "training (transformers' TrainingArguments)": TRAINING_FLAGS_SHOWN,
        "reward-hacking monitor (HackingMonitorCallback)": {f.name for f in fields(HackingMonitorArguments)},
    }
    containers = {title: parser.add_argument_group(title) for title in groups}
    for action in list(parser._actions):
        if action.dest == "help":
            continue
        title = next((t for t, names in groups.items() if action.dest in names), None)
        if title is None:
            action.help = argparse.SUPPRESS
            continue
        if action.dest in HELP_OVERRIDES and not action.option_strings[0].startswith("--no_"):
            action.help = HELP_OVERRIDES[action.dest]
        for group in parser._action_groups:  # move it from the default "options" group to its own
            if action in group._group_actions and group is not containers[title]:
                group._group_actions.remove(action)
        containers[title]._group_actions.append(action)
    return parser
