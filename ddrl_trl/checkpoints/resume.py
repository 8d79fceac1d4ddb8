"""Which run an `output_dir` belongs to, and whether a checkpoint can be resumed exactly — decided before any work.

- A new run refuses an `output_dir` that already holds another run's checkpoints or saved weights, unless
  `overwrite_output_dir=True` (its `checkpoint-*` folders are then deleted) or the run resumes.
- Every save writes `ddrl_run.json`: what makes a run itself (pipeline, denoiser, LoRA shape, base model) and the
  settings that shape its trajectory. Resuming a checkpoint of another model or adapter is refused; resuming with
  changed settings is allowed, with a warning naming each change (the result then differs from an uninterrupted run).
- `verify_checkpoint` checks a checkpoint is complete and readable (trainer state, weights, optimizer, scheduler;
  RNG state, whose absence is reported) before `Trainer` starts loading it; damaged weight files are reported by
  `weight_files.py` as they load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..core.data_beta import AdaptiveDataBeta
from ..data import arrow_column
from ..step.rollout import SavedRollout
from .weight_files import LORA_WEIGHTS_NAME, CheckpointError, load_checkpoint_file

logger = logging.getLogger(__name__)

#: The run record every save writes (`run_info`).
RUN_INFO_NAME = "ddrl_run.json"
#: The key of the adaptive data_beta controller's state in `ddrl_run.json` (`monitoring/adaptive_beta.py`).
DATA_BETA_STATE_KEY = "data_beta_controller"
TRAINER_STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "scheduler.pt"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$")

#: Settings that shape a run's trajectory: resuming with another value is allowed but reported.
TRAJECTORY_SETTINGS = (
    "seed",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "optim",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_inference_steps",
    "eta",
    "flow_noise_level",
    "resolution",
    "num_frames",
    "guidance_scale",
    "resolved_train_step_indices",
    "same_noise_within_group",
    "reward_weights",
    "multi_objective_aggregation",
    "reward_clip",
    "scale_rewards",
    "exp_advantage",
    "advantage_clip",
    "num_iterations",
    "epsilon",
    "data_beta",
    "target_loss_ratio",
    "data_beta_adapt_rate",
    "data_noise",
    "data_timesteps",
    "data_on_first_step_only",
    "kl_beta",
    "ema_decay",
    "bf16",
    "fp16",
    "max_steps",
    "num_train_epochs",
)
#: Trajectory settings that a resume may change without the generic warning: the run's length (the learning-rate
#: schedule is rebuilt for it, with a warning of its own: `DDRLTrainer.train`, `SavingMixin`).
LENGTH_SETTINGS = ("max_steps", "num_train_epochs")


def check_output_dir_writable(
    output_dir: str,
    *,
    setting: str = "output_dir (--output_dir)",
    lost: str = "checkpoints and weights would be lost at the first save",
    keep_created: bool = True,
) -> None:
    """Create `output_dir` if needed and prove a file can be written there; raise `ValueError` if not, naming the
    folder, what would be `lost`, and the `setting` that chooses the folder (its name first, then its CLI flag in
    parentheses and any advice: "output_dir (--output_dir)"). With `keep_created=False` the folders it created are
    removed again (for a folder the run writes only later, such as the monitor's `last_good_dir`)."""
    created, parent = [], os.path.abspath(output_dir)
    while not keep_created and not os.path.exists(parent):
        created.append(parent)  # deepest first
        parent = os.path.dirname(parent)
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".ddrl-write-test-{os.getpid()}")
        with open(probe, "w") as file:
            file.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(
            f"{setting.split(' ', 1)[0]} {output_dir!r} cannot be written ({err.strerror or err}): {lost}. Choose a "
            f"folder you can write to for {setting}."
        ) from err
    finally:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                pass


def checkpoint_folders(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders in `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    names = [
        n for n in os.listdir(output_dir) if _CHECKPOINT_RE.match(n) and os.path.isdir(os.path.join(output_dir, n))
    ]
    return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]))


def saved_run_files(output_dir: str, denoiser_names: tuple[str, ...] = ("unet", "transformer")) -> list[str]:
    """What an earlier run left in `output_dir`: checkpoints, and final weights (LoRA file or denoiser folder)."""
    found = checkpoint_folders(output_dir)
    for name in (LORA_WEIGHTS_NAME, *denoiser_names, RUN_INFO_NAME):
        if os.path.exists(os.path.join(output_dir, name)):
            found.append(name)
    return found


#: `resume_from_checkpoint="latest"`: the newest checkpoint in `output_dir` if there is one, else a new run.
LATEST = "latest"


def _starts_new_run(output_dir: str, resume_from_checkpoint) -> bool:
    """Whether `resume_from_checkpoint` starts a new run: None/False, or "latest" with no checkpoint to resume."""
    if resume_from_checkpoint in (None, False):
        return True
    return resume_from_checkpoint == LATEST and _newest_checkpoint(output_dir) is None


def _newest_checkpoint(output_dir: str) -> str | None:
    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def check_output_dir_free(args, resume_from_checkpoint) -> None:
    """Refuse a new run in an `output_dir` holding another run's work, unless `overwrite_output_dir`; a resumed run
    may use its own folder ("latest" with no checkpoint there starts a new run, and is checked as one). Deletes
    nothing (`prepare_output_dir` does)."""
    if not _starts_new_run(args.output_dir, resume_from_checkpoint) or args.overwrite_output_dir:
        return
    found = saved_run_files(args.output_dir)
    if found:
        shown = ", ".join(found[:6]) + (f", … ({len(found)} in all)" if len(found) > 6 else "")
        raise ValueError(
            f"output_dir {args.output_dir!r} already holds another run's work ({shown}); a new run there would "
            f"overwrite it. To continue that run, pass resume_from_checkpoint=True (--resume_from_checkpoint true); "
            f"to start over there, set overwrite_output_dir=True (--overwrite_output_dir), which deletes its "
            f"checkpoints; or choose another output_dir."
        )


def warn_if_output_dir_taken(args) -> None:
    """At construction, before the reference data are encoded: say now that `train()` will refuse `output_dir`
    unless the run resumes (`resume_from_checkpoint` is only known then) or `overwrite_output_dir` is set."""
    if args.overwrite_output_dir or args.resume_from_checkpoint is not None:
        return
    found = saved_run_files(args.output_dir)
    if found:
        logger.warning(
            "output_dir %r already holds another run's work (%s): train() will refuse to start a new run there. Call "
            "train(resume_from_checkpoint=True) to continue that run, set overwrite_output_dir=True to start over, or "
            "choose another output_dir.",
            args.output_dir,
            ", ".join(found[:6]),
        )


def prepare_output_dir(args, resume_from_checkpoint, is_main_process: bool) -> None:
    """`check_output_dir_free`, then, for a new run with `overwrite_output_dir`, delete the earlier run's checkpoints
    (on the main process), so that `resume_from_checkpoint=True` can never pick one of them later."""
    check_output_dir_free(args, resume_from_checkpoint)
    if _starts_new_run(args.output_dir, resume_from_checkpoint) and args.overwrite_output_dir and is_main_process:
        old = checkpoint_folders(args.output_dir)
        for name in old:
            shutil.rmtree(os.path.join(args.output_dir, name))
        if old:
            logger.warning(
                "overwrite_output_dir=True: deleted the earlier run's checkpoints in %s (%s).",
                args.output_dir,
                ", ".join(old),
            )


def resolve_checkpoint(
    output_dir: str, resume_from_checkpoint: str | bool | None, announce: bool = True
) -> str | None:
    """The checkpoint folder to resume: `True` → the newest in `output_dir` (refused when there is none); "latest"
    → the newest, or None (a new run, said in one line) when there is none, as diffusers' scripts do for restartable
    jobs; a path as given; else None. `announce`: log that "latest" starts a new run (the main process only)."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True or resume_from_checkpoint == LATEST:
        last = _newest_checkpoint(output_dir)
        if last is None and resume_from_checkpoint == LATEST:
            if not announce:
                return None
            logger.warning(
                "resume_from_checkpoint='latest': no checkpoint-N in %s yet, so this starts a new run.", output_dir
            )
            return None
        if last is None:
            raise ValueError(
                f"resume_from_checkpoint=True but output_dir {output_dir!r} holds no checkpoint-N folder to resume. "
                f"Start without resume_from_checkpoint, pass the path of a checkpoint, or pass 'latest' to resume "
                f"when there is one and start a new run otherwise."
            )
        return last
    path = os.fspath(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint={path!r} is not a folder: pass a checkpoint-N folder, or True.")
    return path


def rollout_buffer_name(process_index: int) -> str:
    """The file in which a checkpoint taken between the `num_iterations` of a rollout batch keeps one process's
    batch."""
    return f"rollout_buffer_{process_index}.pt"


def needs_rollout_buffer(global_step: int, num_iterations: int) -> bool:
    """Whether the next step reuses a rollout batch (the checkpoint was taken between its iterations)."""
    return num_iterations > 1 and global_step % num_iterations != 0


def load_rollout_buffer(checkpoint: str, process_index: int, device) -> dict[int, SavedRollout]:
    """This process's rollout batches saved in `checkpoint` (by micro-step), or {} if it holds none."""
    path = os.path.join(checkpoint, rollout_buffer_name(process_index))
    if not os.path.isfile(path):
        return {}
    saved = load_checkpoint_file(path, checkpoint)
    return {int(micro): SavedRollout.from_dict(values, device) for micro, values in saved.items()}


def verify_checkpoint(
    checkpoint: str,
    lora: bool,
    denoiser_name: str,
    deepspeed: bool,
    process_index: int,
    world_size: int,
    num_iterations: int = 1,
) -> None:
    """Raise `CheckpointError` naming the file if `checkpoint` lacks, or cannot read, what an exact resume needs
    (with `num_iterations` > 1, between the iterations of a rollout batch, that batch too); warn if this process's RNG
    state is missing (DDRL's own noise and data order are seeded without it)."""
    state_file = os.path.join(checkpoint, TRAINER_STATE_NAME)
    state = _read_json(state_file, checkpoint)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int) or state["global_step"] < 0:
        raise CheckpointError(f"{state_file} in checkpoint {checkpoint} holds no training state (no global_step).")
    needed = {SCHEDULER_NAME: "the learning-rate schedule"}
    if deepspeed:
        if not os.path.isfile(os.path.join(checkpoint, "latest")):
            needed["latest"] = "DeepSpeed's pointer to its model and optimizer shards"
    else:
        needed[LORA_WEIGHTS_NAME if lora else denoiser_name] = "the trained weights"
        has_optimizer = any(
            name.startswith("optimizer") for name in os.listdir(checkpoint)
        )  # optimizer.pt, optimizer.bin, or FSDP's optimizer folder
        if not has_optimizer:
            needed["optimizer.pt"] = "the optimizer state"
    if needs_rollout_buffer(state["global_step"], num_iterations):
        needed[rollout_buffer_name(process_index)] = (
            f"this process's rollout batch: the checkpoint is between the num_iterations={num_iterations} steps over "
            f"one batch; resume with the number of processes that wrote it"
        )
    missing = [
        f"{name} ({what})" for name, what in needed.items() if not os.path.exists(os.path.join(checkpoint, name))
    ]
    if missing:
        raise CheckpointError(
            f"Checkpoint {checkpoint} is incomplete: it lacks {', '.join(missing)}, so resuming from it would not "
            "continue the run exactly. Resume from a complete checkpoint (an earlier checkpoint-N), or start a new "
            "run."
        )
    rng_name = f"rng_state_{process_index}.pth" if world_size > 1 else "rng_state.pth"
    if not os.path.isfile(os.path.join(checkpoint, rng_name)):
        logger.warning(
            "Checkpoint %s has no %s: the global random state is not restored. DDRL's rollout noise, data order and "
            "LoRA init are seeded without it and resume exactly; randomness drawn by your own code (e.g. a reward "
            "function) will differ from an uninterrupted run.",
            checkpoint,
            rng_name,
        )


def _read_json(path: str, checkpoint: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(
            f"Checkpoint {checkpoint} has no {os.path.basename(path)}: it is not a complete checkpoint."
        )
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path} in checkpoint {checkpoint} is unreadable ({err}): the file is truncated or corrupt. Resume from "
            f"an earlier checkpoint-N."
        ) from err


# ---------------------------------------------------------------------------------------------------- run identity
def data_signature(dataset, prompt_column: str) -> str:
    """`"<rows> rows, prompts <hash>"`: which training data a run used, from its content (a dataset built in memory
    gets a random fingerprint, so the fingerprint cannot tell the same data apart from other data)."""
    prompts = arrow_column(dataset, prompt_column)
    digest = hashlib.sha256("\x00".join(map(str, prompts.to_pylist())).encode()).hexdigest()[:16]
    return f"{len(dataset)} rows, prompts {digest}"


def run_info(trainer) -> dict[str, Any]:
    """What identifies `trainer`'s run (compared strictly on resume) and the settings that shape its trajectory."""
    denoiser = trainer.adapter.denoiser
    lora = None
    if trainer.is_lora:
        config = denoiser.peft_config["default"]
        lora = {
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "target_modules": config.target_modules
            if isinstance(config.target_modules, str)
            else sorted(config.target_modules),
            "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.alpha_pattern),
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
        }
    args = trainer.args
    settings = {name: getattr(args, name, None) for name in TRAJECTORY_SETTINGS}
    settings["world_size"] = args.world_size
    settings["reward_funcs"] = list(trainer.reward_names)
    info = {
        "identity": {
            "pipeline": type(trainer.pipeline).__name__,
            "denoiser": type(denoiser).__name__,
            "base_model": str(trainer.base_model_id) if trainer.base_model_id else None,
            "lora": lora,
        },
        "settings": settings,
        "train_data": trainer.train_data_signature,
    }
    control = getattr(trainer, "data_beta_control", None)
    if control is not None:  # the adaptive data_beta's state, restored on resume (`monitoring/adaptive_beta.py`)
        info[DATA_BETA_STATE_KEY] = control.state_dict()
    return json.loads(json.dumps(info, default=str))  # as it reads back from disk: lists, not tuples


#: What `ddrl_run.json` holds (`run_info`): every version wrote these keys, and these identity fields.
RUN_INFO_KEYS = ("identity", "settings", "train_data", DATA_BETA_STATE_KEY)
_IDENTITY_TYPES = {"pipeline": (str,), "denoiser": (str,), "base_model": (str, type(None)), "lora": (dict, type(None))}


def check_run_info(saved: Any, path: str, checkpoint: str) -> None:
    """Refuse a `ddrl_run.json` that a hand edit or damage has left in another shape than `run_info` writes, with
    `CheckpointError` naming the file and the checkpoint (not a `TypeError` later): the top level, `identity` and
    `settings` must be objects, the identity's fields strings (`lora` an object, `base_model` may be null),
    `train_data` a string, and the adaptive data_beta's state a valid controller state. Keys this version does not
    know, at the top level or in `identity`, are ignored with a warning naming them (a later version may record
    more)."""

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path} in checkpoint {checkpoint} is damaged or was edited by hand: {what}. Restore the file from a "
            f"copy of the checkpoint, or resume from an earlier checkpoint-N."
        )

    def json_type(value: Any) -> str:
        names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
        return names.get(type(value), "a number")

    if not isinstance(saved, dict):
        raise damaged(f"its top level is {json_type(saved)}, not an object")
    missing = [key for key in ("identity", "settings", "train_data") if key not in saved]
    if missing:
        raise damaged(f"it lacks {', '.join(missing)}")
    identity = saved["identity"]
    if not isinstance(identity, dict):
        raise damaged(f"identity is {json_type(identity)}, not an object")
    for key, types in _IDENTITY_TYPES.items():
        if key not in identity:
            raise damaged(f"identity lacks {key}")
        if not isinstance(identity[key], types):
            raise damaged(f"identity.{key} is {json_type(identity[key])} ({identity[key]!r})")
    if not isinstance(saved["settings"], dict):
        raise damaged(f"settings is {json_type(saved['settings'])}, not an object")
    if not isinstance(saved["train_data"], (str, type(None))):
        raise damaged(f"train_data is {json_type(saved['train_data'])} ({saved['train_data']!r}), not a string")
    state = saved.get(DATA_BETA_STATE_KEY)
    if state is not None:
        try:
            AdaptiveDataBeta.from_state_dict(state)
        except ValueError as err:
            raise damaged(f"its adaptive data_beta state ({DATA_BETA_STATE_KEY}) is invalid: {err}") from err
    unknown = [key for key in saved if key not in RUN_INFO_KEYS]
    unknown += [f"identity.{key}" for key in identity if key not in _IDENTITY_TYPES]
    if unknown:
        logger.warning(
            "%s in checkpoint %s holds keys this version does not know (%s): they are ignored. A later version of "
            "ddrl-trl may have written them; if the file was edited by hand, check it.",
            path,
            checkpoint,
            ", ".join(map(str, unknown)),
        )


def check_same_run(checkpoint: str, current: dict[str, Any]) -> dict[str, Any]:
    """Refuse `checkpoint` if another model or adapter wrote it; warn about each changed setting. Returns the
    checkpoint's run info (empty for a checkpoint of an older version, which has none)."""
    path = os.path.join(checkpoint, RUN_INFO_NAME)
    if not os.path.isfile(path):
        logger.warning(
            "Checkpoint %s has no %s (written by an older version): it cannot be checked to belong to this run.",
            checkpoint,
            RUN_INFO_NAME,
        )
        return {}
    saved = _read_json(path, checkpoint)
    check_run_info(saved, path, checkpoint)
    ours, theirs = current["identity"], saved["identity"]
    different = [
        f"{key}: checkpoint {theirs.get(key)!r}, this run {ours[key]!r}"
        for key in ours
        if not (key == "base_model" and (theirs.get(key) is None or ours[key] is None))
        and theirs.get(key) != ours[key]
    ]
    if different:
        raise CheckpointError(
            f"Checkpoint {checkpoint} was written by another run ({'; '.join(different)}), so it cannot be resumed "
            f"here. Resume it with the model and peft_config that wrote it, or start this run in another output_dir "
            f"(or with overwrite_output_dir=True to replace that run's checkpoints)."
        )
    changed = [
        f"{key} {value!r} → {current['settings'].get(key)!r}"
        for key, value in saved.get("settings", {}).items()
        if current["settings"].get(key) != value and key not in LENGTH_SETTINGS
    ]
    if saved.get("train_data") != current["train_data"]:
        changed.append(f"train_dataset ({saved.get('train_data')} → {current['train_data']})")
    if changed:
        logger.warning(
            "Resuming %s with changed settings: %s. The result will differ from an uninterrupted run.",
            checkpoint,
            "; ".join(changed),
        )
    return saved


def saved_progress(checkpoint: str) -> tuple[int, int]:
    """The optimiser step `checkpoint` was saved at, and the run's `max_steps` then (from its trainer state)."""
    state = _read_json(os.path.join(checkpoint, TRAINER_STATE_NAME), checkpoint)
    try:
        return int(state["global_step"]), int(state["max_steps"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{os.path.join(checkpoint, TRAINER_STATE_NAME)} in checkpoint {checkpoint} lacks a valid global_step or "
            f"max_steps ({err}): it is damaged. Resume from an earlier checkpoint-N."
        ) from err


def announce_resume(checkpoint: str, saved_settings: dict, args, is_main_process: bool) -> None:
    """Say which checkpoint resumes at which step, and warn when the run's length changed (the most common
    resume: "train N more steps"), whose learning-rate schedule `DDRLTrainer._load_optimizer_and_scheduler` rebuilds.
    Refuses, before any work, a checkpoint saved at or past `max_steps`."""
    step, saved_max_steps = saved_progress(checkpoint)
    if 0 < args.max_steps <= step:  # Trainer would train a step past max_steps, or return having done nothing
        raise ValueError(
            f"{checkpoint} was saved at step {step}, and max_steps is {args.max_steps}: there is nothing left to "
            f"train. To train longer, raise max_steps (e.g. to {2 * step}); the learning-rate schedule is then "
            f"rebuilt for the new length."
        )
    if not is_main_process:
        return
    if args.max_steps > 0:
        logger.info("Resuming from %s (step %d of max_steps=%d).", checkpoint, step, args.max_steps)
    else:
        logger.info(
            "Resuming from %s (step %d; the run's length is num_train_epochs=%g).",
            checkpoint,
            step,
            args.num_train_epochs,
        )
    saved_epochs = saved_settings.get("num_train_epochs")
    if args.max_steps <= 0 and saved_epochs is not None and saved_epochs != args.num_train_epochs:
        logger.warning(
            "Resuming %s with num_train_epochs=%g; it was saved by a run of num_train_epochs=%g. The learning-"
            "rate schedule is rebuilt for the new length and continues at step %d (the result differs from a run "
            "of that length straight through). The new length is recorded in ddrl_run.json.",
            checkpoint,
            args.num_train_epochs,
            saved_epochs,
            step,
        )
    if args.max_steps > 0 and args.max_steps != saved_max_steps:
        logger.warning(
            "Resuming %s with max_steps=%d; it was saved by a run of max_steps=%d. The learning-rate schedule is "
            "rebuilt for %d steps and continues at step %d (steps 1-%d followed the %d-step schedule, so the "
            "result differs from a %d-step run straight through). The new length is recorded in ddrl_run.json.",
            checkpoint,
            args.max_steps,
            saved_max_steps,
            args.max_steps,
            step,
            step,
            saved_max_steps,
            args.max_steps,
        )
