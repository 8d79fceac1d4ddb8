"""`ddrl-trl train` and `examples/train_*.py`: DDRL from the command line, the way TRL's `trl grpo` runs.

    ddrl-trl train --family sd3 --dataset_name <paired prompt/image data> --reward_funcs <reward> --output_dir out
    accelerate launch examples/train_sd3.py --config ddrl.yaml

`main` reads top to bottom as TRL's `scripts/grpo.py`: checks → data → `DDRLTrainer(...)` →
`train(resume_from_checkpoint=...)` → `save_model` → `push_to_hub`. Arguments are parsed by `DDRLParser` (a
`trl.TrlParser`, in `arguments.py`) from `DDRLScriptArguments` (dataset), `DDRLConfig` (training),
`ModelConfig` (model and LoRA), `RewardArguments` and `HackingMonitorArguments`, over the model family's defaults
(`FAMILY_DEFAULTS`); a YAML `--config` overrides those and command-line flags override both. `--help` shows the flags
that mean something for a diffusion pipeline; TRL's and transformers' language-model flags are hidden.

- `--reward_funcs` is required (there is no safe default reward).
- `--resume_from_checkpoint` takes a checkpoint folder, `true` for the newest one in `--output_dir`, or `latest` for
  the newest one or a new run when there is none yet.
- A new run refuses an `--output_dir` holding another run's work (unless `--overwrite_output_dir`), and every flag
  that has no meaning for a diffusion pipeline (`--load_in_4bit`, `--dataset_streaming`, ...) is refused rather than
  ignored — all before the model is loaded.
- Bad arguments raise `UsageError` (one line and exit code 2 from `ddrl-trl train` and the example scripts) naming
  the command-line flags, before the model loads; errors during training keep their type and traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from trl import ModelConfig, ScriptArguments

from ..errors import UsageError
from ..rewards import REWARD_SPEC_HELP
from .arguments import (  # the parser's names are also read from here (tests, examples)
    HACKING_SIGNALS,  # noqa: F401
    UNSUPPORTED_FLAGS,
    DDRLScriptArguments,
    HackingMonitorArguments,
    RewardArguments,
    flag_names,
    make_parser,
    read_config,
)
from .families import FAMILIES, FAMILY_DEFAULTS  # noqa: F401 — FAMILY_DEFAULTS is read from here too

if TYPE_CHECKING:
    from datasets import Dataset

    from ..config import DDRLConfig
    from ..monitoring.hacking_monitor import HackingMonitorCallback
    from ..trainer import DDRLTrainer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- the run
def main(
    script_args: ScriptArguments,
    training_args: DDRLConfig,
    model_args: ModelConfig,
    reward_args: RewardArguments,
    monitor_args: HackingMonitorArguments | None = None,
) -> DDRLTrainer:
    """Train with DDRL from parsed arguments, resume if asked, save, and push to the Hub if asked. Bad arguments
    raise `UsageError` before the model is loaded (and before training, for those only found in the data)."""
    from ..adapters.preparation import load_pipeline
    from ..trainer import DDRLTrainer

    warn_if_accelerate_started_one_process()
    _find_modules_in_working_dir()
    resume = resume_argument(training_args.resume_from_checkpoint)
    check_arguments(script_args, training_args, model_args, reward_args, resume, monitor_args)
    monitor = hacking_monitor(monitor_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        **(training_args.model_init_kwargs or {}),
    }
    train_dataset, eval_dataset = load_data(script_args, reward_args.max_train_samples)
    validation_from_eval_rows = training_args.num_validation_prompts > 0 and not training_args.validation_prompts
    watches_loss = monitor is not None and "loss_ratio" in monitor.watch
    if training_args.eval_strategy == "no" and not watches_loss and not validation_from_eval_rows:
        eval_dataset = None
    if watches_loss and eval_dataset is None:
        raise UsageError(
            f"--hacking_watch loss_ratio needs held-out data, and --dataset_name {script_args.dataset_name} has no "
            f"{script_args.dataset_test_split!r} split (--dataset_test_split): add one, or watch the validation "
            "samples only (--hacking_watch diversity, with --validation_prompts)."
        )
    k = getattr(script_args, "synthetic_references_per_prompt", None)
    if k is not None:
        check_prompt_only(train_dataset, k, training_args, "training")
    reward_funcs, eval_reward_funcs = resolve_rewards(reward_args)
    model: Any = model_args.model_name_or_path
    with construction_errors():
        if k is not None:
            model = load_pipeline(model, training_args, training_args.device)
            train_dataset = with_synthetic_references(model, train_dataset, k, training_args, "training")
            if eval_dataset is not None and not has_reference_column(eval_dataset, training_args):
                eval_dataset = with_synthetic_references(model, eval_dataset, k, training_args, "evaluation")
        trainer = DDRLTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=lora_config(model_args),
            callbacks=[monitor] if monitor is not None else None,
            eval_reward_funcs=eval_reward_funcs,
        )
    trainer.train(resume_from_checkpoint=resume)
    saved = save_output(trainer, monitor, training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if trainer.is_world_process_zero():
        print(f"weights saved to {saved}", flush=True)
    return trainer


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `DDRLTrainer.train` takes it: `true` → True (the newest checkpoint in
    `--output_dir`, which must hold one), `latest` → "latest" (the newest one, or a new run when there is none, for
    restartable jobs), `false` / `none` / empty → None, anything else a checkpoint folder."""
    from ..checkpoints.resume import LATEST

    if value is None or isinstance(value, bool):
        return value or None
    if value.strip().lower() == LATEST:
        return LATEST
    if value.strip().lower() in ("true", "yes", "1"):
        return True
    if value.strip().lower() in ("false", "none", "no", "0", ""):
        return None
    return value


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` could be a Hub repo id (`name` or `owner/name`) rather than only a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and ".." not in name


def check_arguments(
    script_args: ScriptArguments,
    training_args: DDRLConfig,
    model_args: ModelConfig,
    reward_args: RewardArguments,
    resume: str | bool | None,
    monitor_args: HackingMonitorArguments | None = None,
) -> None:
    """What can be checked before loading the model and data: a reward is named, no flag would be ignored,
    `output_dir` may be used and the checkpoint to resume has steps left, the data and the model exist, and the flags
    agree with each other. Raises `UsageError` naming the flags."""
    check_flags(script_args, model_args, reward_args)
    check_output_and_resume(training_args, resume)
    check_sources(script_args, model_args)
    validation = bool(training_args.validation_prompts) or training_args.num_validation_prompts > 0
    if reward_args.eval_reward_funcs and not validation:
        raise UsageError(
            "--eval_reward_funcs score the validation samples, but there are none: add --validation_prompts "
            '"a prompt" "another prompt", or --num_validation_prompts K to validate on the first K rows of the test '
            "split (--dataset_test_split)."
        )
    if monitor_args is not None:
        check_monitor_arguments(monitor_args, reward_args, validation)


def check_flags(script_args: ScriptArguments, model_args: ModelConfig, reward_args: RewardArguments) -> None:
    """A reward and a model are named, and no flag is set that a diffusion pipeline would ignore."""
    if not reward_args.reward_funcs:
        raise UsageError(
            f"--reward_funcs is required: name the reward(s) to train on, each {REWARD_SPEC_HELP}. There is no "
            "default: a reward chosen by accident is what RL optimises (the built-in 'brightness' trains toward "
            "white images)."
        )
    if model_args.model_name_or_path is None:
        raise UsageError("--model_name_or_path is required: a diffusers pipeline's Hub id or local folder.")
    ignored = {
        name: getattr(args, name)
        for args in (script_args, model_args)
        for name, accepted in UNSUPPORTED_FLAGS.items()
        if hasattr(args, name) and getattr(args, name) != accepted
    }
    if ignored:
        raise UsageError(
            f"{', '.join(f'--{name} {value}' for name, value in ignored.items())}: not supported for diffusion "
            f"pipelines (quantised loading, attention backends, extra LoRA modules, streamed datasets). Drop them."
        )
    if model_args.dtype not in (None, "auto", "float32"):
        raise UsageError(
            f"--dtype {model_args.dtype}: the trainer chooses dtypes itself (float32 trained weights, the frozen "
            "parts in bf16/fp16 under --bf16 / --fp16). Use --bf16 or --fp16 instead."
        )


def check_output_and_resume(training_args: DDRLConfig, resume: str | bool | None) -> None:
    """`--output_dir` can be written and holds no other run's work (unless resuming or overwriting), and the
    checkpoint to resume, if any, has steps left to train under `--max_steps`."""
    from ..checkpoints.resume import (
        check_output_dir_free,
        check_output_dir_writable,
        resolve_checkpoint,
        saved_progress,
    )

    try:
        if training_args.should_save:
            check_output_dir_writable(training_args.output_dir)
        check_output_dir_free(training_args, resume)
        checkpoint = resolve_checkpoint(training_args.output_dir, resume, announce=False)
        step = saved_progress(checkpoint)[0] if checkpoint is not None else None
    except ValueError as err:
        raise UsageError(str(err)) from err
    if step is not None and 0 < training_args.max_steps <= step:
        raise UsageError(
            f"--resume_from_checkpoint: {checkpoint} was saved at step {step}, and --max_steps is "
            f"{training_args.max_steps}: there is nothing left to train. Raise --max_steps (e.g. to {2 * step}) to "
            "train longer; the learning-rate schedule is then rebuilt for the new length."
        )


def check_sources(script_args: ScriptArguments, model_args: ModelConfig) -> None:
    """The dataset and the model name a folder that exists or a Hub id, and `--synthetic_references_per_prompt` is a
    count."""
    name = script_args.dataset_name
    if name is None:
        raise UsageError(
            "--dataset_name is required: a Hub dataset id or a folder saved with Dataset.save_to_disk, holding "
            "prompts and their paired reference images (or prompts only, with --synthetic_references_per_prompt)."
        )
    if not os.path.exists(name) and not looks_like_hub_id(name):
        raise UsageError(
            f"--dataset_name {name}: no such folder (and not a Hub dataset id 'owner/name'). Give a folder saved "
            "with Dataset.save_to_disk, or a Hub dataset id."
        )
    model = model_args.model_name_or_path
    if not os.path.exists(model) and not looks_like_hub_id(model):
        raise UsageError(
            f"--model_name_or_path {model}: no such folder (and not a Hub id 'owner/name'). Give a diffusers "
            "pipeline folder (with model_index.json) or its Hub id."
        )
    k = getattr(script_args, "synthetic_references_per_prompt", None)
    if k is not None and k < 1:
        raise UsageError(f"--synthetic_references_per_prompt must be ≥ 1 (reference images per prompt), got {k}.")


def check_monitor_arguments(
    monitor_args: HackingMonitorArguments, reward_args: RewardArguments, validation: bool
) -> None:
    """The `--hacking_*` flags: only with `--hacking_monitor`, and with what their signals are measured on."""
    changed = [
        f"--{f.name}"
        for f in fields(HackingMonitorArguments)
        if f.name != "hacking_monitor"
        and getattr(monitor_args, f.name) != (f.default_factory() if callable(f.default_factory) else f.default)
    ]
    if not monitor_args.hacking_monitor:
        if changed:
            raise UsageError(f"{', '.join(changed)} set without --hacking_monitor: add --hacking_monitor to use it.")
        return
    watch = hacking_monitor(monitor_args).watch
    if {"eval_rewards", "diversity"} & set(watch) and not validation:
        raise UsageError(
            f"--hacking_watch {' '.join(watch)} watches the validation samples, but there are none: add "
            '--validation_prompts "a prompt" "another prompt" (or --num_validation_prompts K with a test split).'
        )
    if "eval_rewards" in watch and not reward_args.eval_reward_funcs:
        raise UsageError(
            "--hacking_watch eval_rewards needs --eval_reward_funcs (rewards not trained on, whose fall the monitor "
            "watches)."
        )


def hacking_monitor(monitor_args: HackingMonitorArguments | None) -> HackingMonitorCallback | None:
    """The `HackingMonitorCallback` the `--hacking_*` flags ask for, or None without `--hacking_monitor`."""
    if monitor_args is None or not monitor_args.hacking_monitor:
        return None
    from ..monitoring.hacking_monitor import HackingMonitorCallback

    try:
        return HackingMonitorCallback(
            threshold=monitor_args.hacking_threshold,
            eval_steps=monitor_args.hacking_eval_steps,
            stop_training=monitor_args.hacking_stop_training,
            last_good_dir=monitor_args.hacking_last_good_dir,
            watch=monitor_args.hacking_watch,  # one name (a YAML string) or several
            max_eval_reward_drop=monitor_args.hacking_max_eval_reward_drop,
            min_diversity_ratio=monitor_args.hacking_min_diversity_ratio,
        )
    except ValueError as err:  # "threshold must be > 1 ..., set e.g. threshold=1.10" → "--hacking_threshold ..."
        names = "threshold|eval_steps|stop_training|last_good_dir|watch|max_eval_reward_drop|min_diversity_ratio"
        message = re.sub(
            rf"(?<![\w./'\"-])({names})(=|\b)",
            lambda m: f"--hacking_{m.group(1)}{' ' if m.group(2) == '=' else ''}",
            str(err),
        )
        raise UsageError(message) from err


def resolve_rewards(reward_args: RewardArguments) -> tuple[list, list]:
    """The reward functions `--reward_funcs` and `--eval_reward_funcs` name, resolved before the model loads (a bad
    name or import path is a `UsageError`); the trainer takes the functions."""
    from ..rewards import resolve_reward
    from ..rewards.calling import reward_name

    resolved = []
    for flag, specs in (
        ("--reward_funcs", reward_args.reward_funcs),
        ("--eval_reward_funcs", reward_args.eval_reward_funcs),
    ):
        funcs = []
        for spec in specs or []:
            try:
                funcs.append(resolve_reward(spec))
            except (ValueError, TypeError) as err:
                hint = (
                    " The current folder is searched too; for a module elsewhere, add its folder to PYTHONPATH."
                    if "Cannot import" in str(err)
                    else ""
                )
                raise UsageError(f"{flag} {spec}: {err}{hint}") from err
        resolved.append(funcs)
    names = [reward_name(f) for f in resolved[0] + resolved[1]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(
            f"--reward_funcs and --eval_reward_funcs name rewards {', '.join(map(repr, duplicates))} more than once "
            f"(all: {', '.join(names)}): each reward is logged under its name (rewards/<name>, eval_rewards/<name>), "
            "so give each only once, or rename a function."
        )
    return resolved[0], resolved[1]


def lora_config(model_args: ModelConfig):
    """`trl.get_peft_config`, for a diffusers denoiser (no transformers task type), or None without `--use_peft`."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is not None:
        config.task_type = None
    return config


def load_data(script_args: ScriptArguments, max_train_samples: int | None = None) -> tuple[Dataset, Dataset | None]:
    """The train split and, if present, the test split of `--dataset_name`: a Hub id or a `save_to_disk` folder.
    A dataset that cannot be loaded (no such folder, no such Hub dataset, offline) is a `UsageError`."""
    from datasets import load_dataset, load_from_disk

    name = script_args.dataset_name
    if name is None:
        raise UsageError("--dataset_name is required: a Hub dataset id or a folder saved with Dataset.save_to_disk.")
    saved = os.path.isdir(name) and (
        os.path.isfile(os.path.join(name, "dataset_info.json"))
        or os.path.isfile(os.path.join(name, "dataset_dict.json"))
    )
    try:
        data = load_from_disk(name) if saved else load_dataset(name, script_args.dataset_config)
    except (OSError, ValueError) as err:  # offline, no such dataset, unreadable files: OSError subclasses mostly
        raise UsageError(f"--dataset_name {name}: cannot load it ({_one_line(err)}).") from err
    train, test = data, None
    if hasattr(data, "keys"):  # a DatasetDict
        if script_args.dataset_train_split not in data:
            raise UsageError(
                f"--dataset_name {name} has no {script_args.dataset_train_split!r} split (its splits: "
                f"{', '.join(data)}): name the training split with --dataset_train_split."
            )
        train = data[script_args.dataset_train_split]
        test = data[script_args.dataset_test_split] if script_args.dataset_test_split in data else None
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    return train, test


def has_reference_column(dataset: Dataset, training_args: DDRLConfig) -> bool:
    """Whether `dataset` holds paired reference samples (`--reference_column`, else an image or video column)."""
    from ..data import reference_column_of

    return reference_column_of(dataset, training_args.reference_column) in dataset.column_names


def check_prompt_only(dataset: Dataset, k: int, training_args: DDRLConfig, split: str) -> None:
    """Before the pipeline loads: refuse `--synthetic_references_per_prompt` for data that already hold references
    (they would be ignored), and for data without the prompt column."""
    from ..data import reference_column_of, with_prompt_column

    if has_reference_column(dataset, training_args):
        raise UsageError(
            f"--synthetic_references_per_prompt {k}: the {split} data already have reference samples (column "
            f"{reference_column_of(dataset, training_args.reference_column)!r}). Drop "
            "--synthetic_references_per_prompt to train on them, or remove the column (dataset.remove_columns) to "
            "train on synthetic references instead."
        )
    if training_args.prompt_column not in with_prompt_column(dataset, training_args.prompt_column, split).column_names:
        raise UsageError(
            f"The {split} data have no prompt column {training_args.prompt_column!r} (their columns: "
            f"{', '.join(dataset.column_names)}): name it with --prompt_column."
        )


#: Where the synthetic references are kept under `--output_dir`, one folder per split and content (`_references_key`).
SYNTHETIC_REFERENCES_DIR = "synthetic_references"


def with_synthetic_references(pipeline, dataset: Dataset, k: int, training_args: DDRLConfig, split: str) -> Dataset:
    """`dataset` (prompts only) with `k` reference images per prompt sampled by the base `pipeline`, exactly as
    `build_synthetic_reference_dataset(pipeline, prompts, images_per_prompt=k, config=training_args)` makes them;
    each row is repeated `k` times, so its other columns still reach the rewards.

    The main process samples them once and keeps them in `<output_dir>/synthetic_references/<split>-<key>` (written
    whole or not at all); the other processes, and a resumed or repeated run with the same prompts, model and
    sampling settings (the key), load that copy: every process trains on the same references, sampled once."""
    from datasets import concatenate_datasets, load_from_disk

    from ..checkpoints.weight_files import atomic_directory_update
    from ..data import build_synthetic_reference_dataset, reference_column_of, with_prompt_column

    check_prompt_only(dataset, k, training_args, split)
    dataset = with_prompt_column(dataset, training_args.prompt_column, split)
    prompts = list(dataset[training_args.prompt_column])
    cache = os.path.join(
        training_args.output_dir,
        SYNTHETIC_REFERENCES_DIR,
        f"{split}-{_references_key(pipeline, prompts, k, training_args)}",
    )
    with training_args.main_process_first(desc=f"synthetic {split} references"):
        if os.path.isdir(cache):
            logger.info("Using the synthetic %s references sampled earlier, in %s.", split, cache)
            references = load_from_disk(cache)
        else:
            logger.info(
                "Sampling %d synthetic reference image(s) for each of the %d %s prompts.", k, len(prompts), split
            )
            references = build_synthetic_reference_dataset(
                pipeline, prompts, images_per_prompt=k, config=training_args
            )
            if training_args.should_save:
                with atomic_directory_update(os.path.dirname(cache)) as staging:
                    references.save_to_disk(os.path.join(staging, os.path.basename(cache)))
    column = reference_column_of(dataset, training_args.reference_column)
    references = references.select_columns(["image"])
    if column != "image":
        references = references.rename_column("image", column)
    repeated = dataset.select([row for row in range(len(dataset)) for _ in range(k)])
    return concatenate_datasets([repeated, references], axis=1)


def _references_key(pipeline, prompts: list[str], k: int, training_args: DDRLConfig) -> str:
    """What the synthetic references depend on: the model, the prompts, `k` and the settings they are sampled with."""
    import hashlib

    settings = ("num_inference_steps", "resolution", "num_frames", "cfg_scale", "negative_prompt", "guidance_scale")
    settings += ("max_sequence_length", "seed", "bf16", "fp16", "model_init_kwargs")
    content = {
        "model": str(getattr(pipeline, "name_or_path", "")),
        "prompts": prompts,
        "k": k,
        **{name: getattr(training_args, name, None) for name in settings},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def construction_errors() -> Iterator[None]:
    """ValueErrors raised by ddrl_trl's own checks while the trainer is built (a missing column, an unreadable
    image, an impossible resolution) → `UsageError` naming the flags. Errors raised elsewhere (a reward's own code,
    diffusers) keep their type and traceback."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        if not _raised_by_ddrl_trl(err):
            raise
        from ..config import DDRLConfig

        names = {f.name for f in fields(DDRLConfig)} | {f.name for c in _ARGUMENT_CLASSES for f in fields(c)}
        raise UsageError(flag_names(str(err), names)) from err


_ARGUMENT_CLASSES = (DDRLScriptArguments, ModelConfig, RewardArguments, HackingMonitorArguments)


def _raised_by_ddrl_trl(err: BaseException) -> bool:
    """Whether `err` was raised in ddrl_trl's own code (its innermost frame is in this package)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # ddrl_trl/, above cli/
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)


def save_output(trainer: DDRLTrainer, monitor: HackingMonitorCallback | None, output_dir: str) -> str:
    """Save the run's weights to `output_dir`, and return where they are. After a run the monitor stopped for reward
    hacking, the model is given back its last good weights first (`restore_last_good`), so the output, its model
    card and a `--push_to_hub` upload are those, not the hacked final ones; without last good weights, or when
    training went on, the final weights are saved (with `save_model`'s warning)."""
    stopped = monitor is not None and monitor.stop_training and monitor.hacking_step is not None
    if stopped and monitor.last_good_step is not None and monitor.last_good_path is not None:
        step = trainer.restore_last_good(monitor.last_good_path, monitor.last_good_step)
        if trainer.is_world_process_zero():
            logger.warning(
                "Training stopped: reward hacking was detected at step %d. The weights saved in %s (and pushed, "
                "with --push_to_hub) are the last good ones, of step %d (from %s), not the final step's.",
                monitor.hacking_step,
                output_dir,
                step,
                monitor.last_good_path,
            )
    trainer.save_model(output_dir)
    return output_dir


def warn_if_accelerate_started_one_process(env: dict[str, str] | None = None) -> str | None:
    """Log (and return) one line when `accelerate launch` was asked for several processes but started one.

    accelerate's simple launcher (what `accelerate launch --num_processes N` uses without `--multi_gpu`, e.g. with
    `--cpu` or on a machine with fewer than two GPUs) starts a single process and sets no WORLD_SIZE; it sets
    MASTER_ADDR / MASTER_PORT only when more than one process or machine was asked for. accelerate has no variable
    holding the number asked for."""
    env = os.environ if env is None else env
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env
    asked_for_more = "MASTER_ADDR" in env or "MASTER_PORT" in env
    if not (launched_by_accelerate and asked_for_more and int(env.get("WORLD_SIZE") or 1) <= 1):
        return None
    message = (
        "accelerate launch started ONE process (its simple launcher, used without --multi_gpu, ignores "
        "--num_processes): for N processes run `accelerate launch --multi_gpu --num_processes N --num_machines 1 "
        "--mixed_precision no --dynamo_backend no <script> ...` (on CPU add --use_cpu to the script's flags), or "
        "`torchrun --nproc_per_node N`."
    )
    logger.warning(message)
    return message


def _find_modules_in_working_dir() -> None:
    """Let `--reward_funcs mymod:f` import mymod.py from the current folder, as `python -m` would (the `ddrl-trl`
    command's and a script's sys.path hold their own folder instead). Appended, so that a file there cannot shadow an
    installed package."""
    cwd = os.getcwd()
    if not any(os.path.abspath(entry or ".") == cwd for entry in sys.path):
        sys.path.append(cwd)


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


# ---------------------------------------------------------------------------------------------------- entry points
def infer_family(model_name_or_path: str, revision: str | None = None) -> str:
    """The model family of a pipeline folder or Hub id (at `revision`: Cosmos keeps its diffusers files on a branch),
    from its `model_index.json` (the pipeline class's adapter's `script_family`)."""
    families = ", ".join(FAMILIES)
    if os.path.isdir(model_name_or_path):
        path = os.path.join(model_name_or_path, "model_index.json")
        if not os.path.isfile(path):
            raise UsageError(
                f"Cannot read {model_name_or_path}'s model_index.json to infer its family (the folder has none: is it "
                f"a diffusers pipeline saved with save_pretrained?): pass --family ({families})."
            )
    elif not looks_like_hub_id(model_name_or_path):
        raise UsageError(
            f"Cannot read {model_name_or_path}'s model_index.json to infer its family: no such folder, and not a Hub "
            f"id 'owner/name'. Give a diffusers pipeline folder or Hub id as --model_name_or_path, or pass --family "
            f"({families}) for its default model."
        )
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(model_name_or_path, "model_index.json", revision=revision)
        except Exception as err:  # noqa: BLE001 — offline, unknown repo, no such file: all mean "cannot tell"
            raise UsageError(
                f"Cannot read {model_name_or_path}'s model_index.json to infer its family ({_one_line(err)}): pass "
                f"--family ({families})."
            ) from err
    try:
        with open(path, encoding="utf-8") as file:
            index = json.load(file)
    except (OSError, ValueError) as err:
        raise UsageError(
            f"Cannot read {model_name_or_path}'s model_index.json ({_one_line(err)}): pass --family ({families})."
        ) from err
    pipeline = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(pipeline, str):
        raise UsageError(
            f'{model_name_or_path}\'s model_index.json names no pipeline class (its "_class_name" is missing), so '
            f"its family cannot be inferred: pass --family ({families}), or save the pipeline again with diffusers' "
            "save_pretrained."
        )
    import diffusers

    from ..adapters import adapter_class

    adapter = adapter_class(getattr(diffusers, pipeline, type(None)))
    if adapter is None or adapter.script_family is None:
        raise UsageError(
            f"{model_name_or_path} is a {pipeline}, which `ddrl-trl train` has no family for: pass "
            f"--family ({families}) or use DDRLTrainer from Python."
        )
    return adapter.script_family


class _FirstParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def train_command(argv: list[str]) -> DDRLTrainer | None:
    """`ddrl-trl train [--family F] ...`: the family from `--family`, or from the pipeline `--model_name_or_path`
    (on the command line or in `--config`) names; then `main` with that family's defaults. Bad arguments raise
    `UsageError` before anything loads; errors during training keep their own type and traceback."""
    first = _FirstParser(add_help=False, allow_abbrev=False)
    first.add_argument("--family", choices=FAMILIES)
    first.add_argument("--model_name_or_path")
    first.add_argument("--model_revision")
    first.add_argument("--config")
    known, rest = first.parse_known_args(argv)
    usage = f"ddrl-trl train [--family {{{','.join(FAMILIES)}}}] [--config FILE.yaml] [--<argument> VALUE ...]"
    if any(arg in ("-h", "--help") for arg in rest):
        print(TRAIN_HELP)
        make_parser(known.family or "sd", prog="ddrl-trl train", usage=usage).parse_args_and_config(args=["--help"])
        return None
    model, revision = known.model_name_or_path, known.model_revision
    if known.config and (model is None or revision is None):
        from_config = read_config(known.config)
        model = model or from_config.get("model_name_or_path")
        revision = revision or from_config.get("model_revision")
    family = known.family or (infer_family(str(model), revision) if model else None)
    if family is None:
        raise UsageError(
            f"Name the model: --model_name_or_path (its family is inferred), or --family ({', '.join(FAMILIES)}) for "
            "its default model."
        )
    argv = [*rest, *(["--config", known.config] if known.config else [])]
    argv += ["--model_name_or_path", known.model_name_or_path] if known.model_name_or_path else []
    argv += ["--model_revision", known.model_revision] if known.model_revision else []
    parsed = make_parser(family, prog="ddrl-trl train", usage=usage).parse_args_and_config(args=argv)
    return main(*parsed)


@contextlib.contextmanager
def exit_on_usage_error(prog: str) -> Iterator[None]:
    """For scripts: a `UsageError` (bad arguments, found before any work) ends the program with one line on stderr
    and exit code 2, as argparse does; errors during training keep their traceback."""
    try:
        yield
    except UsageError as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


TRAIN_HELP = f"""ddrl-trl train: DDRL training with TRL-style arguments, as examples/train_*.py.

  --family {{{",".join(FAMILIES)}}}
                        the model family whose defaults apply (ddrl_trl.cli.families.FAMILY_DEFAULTS); by default
                        inferred from --model_name_or_path's model_index.json (here or in --config)
"""


if __name__ == "__main__":
    with exit_on_usage_error("ddrl-trl train"):
        train_command(sys.argv[1:])
