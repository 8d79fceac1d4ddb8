"""`HackingMonitorCallback`: watch the reward-hacking signals while training, and act on them (docs/metrics.md).

The paper's signal (arXiv 2512.04332, §5): a post-trained model whose diffusion loss on held-out data is more than
10 % above the base model's is hacking the reward. `DDRLTrainer.evaluate()` measures that ratio
(`eval_diffusion_loss_ratio`, seeded draws, the base model measured on the same draws); under classifier-free
guidance also the guided output's (`eval_guided_diffusion_loss_ratio`), since guidance amplifies a drift the
conditional model's ratio does not show (docs/concepts.md). With validation prompts it can also watch the evaluation
rewards (rewards not trained on, which should not fall) and the samples' within-prompt diversity (which should not
collapse). The callback asks for an evaluation every `eval_steps` optimiser steps, keeps the weights of the last step
where no watched signal tripped, warns when one does, and optionally stops training there.
"""

from __future__ import annotations

import logging
import math
import os

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

#: The signals the monitor can watch.
SIGNALS = ("loss_ratio", "eval_rewards", "diversity")


class HackingMonitorCallback(TrainerCallback):
    """Evaluate every `eval_steps` steps; warn (and optionally stop) when a watched signal trips:

    - `"loss_ratio"`: the held-out diffusion-loss ratio passes `threshold` (under guidance: the conditional or the
      guided output's ratio, whichever is higher; a non-finite one counts as the worst);
    - `"eval_rewards"`: an evaluation reward (the trainer's `eval_reward_funcs`, not trained on) falls by more than
      `max_eval_reward_drop` of the base model's value on the same validation seeds, (base − now) / |base|;
    - `"diversity"`: the validation samples' within-prompt diversity falls under `min_diversity_ratio` of the base
      model's (`eval_diversity_ratio`).

    Pass it to `DDRLTrainer(callbacks=[HackingMonitorCallback(...)])`; `"loss_ratio"` needs an `eval_dataset` of
    held-out prompts and paired reference samples, the other two need validation prompts (`validation_prompts` or
    `num_validation_prompts`), and `"eval_rewards"` needs `eval_reward_funcs`. After each evaluation where nothing
    tripped, the weights are saved (atomically, in diffusers' format) to `<output_dir>/<last_good_dir>`, so a run
    stopped for hacking, or one you stop yourself, keeps its last good model. Logged: `hacking/last_good_step` and
    `hacking/detected` (0 or 1).

    Args:
        threshold: the loss ratio above which the run counts as hacking (the paper's 1.10).
        eval_steps: how often to measure, in optimiser steps.
        stop_training: stop the run at the first evaluation where a signal trips.
        last_good_dir: folder (under `output_dir`) for the last good weights; None to not save them.
        watch: which of `SIGNALS` decide ("loss_ratio", "eval_rewards", "diversity").
        max_eval_reward_drop: the largest relative fall of an evaluation reward below the base model's.
        min_diversity_ratio: the smallest diversity, as a fraction of the base model's.
    """

    #: The ratios watched, when `evaluate()` reports them.
    WATCHED = ("eval_diffusion_loss_ratio", "eval_guided_diffusion_loss_ratio")

    def __init__(
        self,
        threshold: float = 1.10,
        eval_steps: int = 50,
        stop_training: bool = False,
        last_good_dir: str | None = "last-good",
        watch: tuple[str, ...] | list[str] = ("loss_ratio",),
        max_eval_reward_drop: float = 0.10,
        min_diversity_ratio: float = 0.5,
    ):
        if not threshold > 1.0:
            raise ValueError(
                f"threshold must be > 1 (a ratio to the base model's loss; the paper uses 1.10), got {threshold}."
            )
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be ≥ 1, got {eval_steps}.")
        watch = (watch,) if isinstance(watch, str) else tuple(watch)
        unknown = [w for w in watch if w not in SIGNALS]
        if unknown or not watch:
            raise ValueError(f"watch must name one or more of {SIGNALS}, got {watch!r}.")
        if not 0 < max_eval_reward_drop < math.inf:
            raise ValueError(f"max_eval_reward_drop must be > 0 (e.g. 0.10 for 10 %), got {max_eval_reward_drop}.")
        if not 0 < min_diversity_ratio < 1:
            raise ValueError(f"min_diversity_ratio must be in (0, 1) (e.g. 0.5), got {min_diversity_ratio}.")
        self.threshold, self.eval_steps = threshold, eval_steps
        self.stop_training, self.last_good_dir = stop_training, last_good_dir
        self.watch, self.max_eval_reward_drop, self.min_diversity_ratio = (
            watch,
            max_eval_reward_drop,
            min_diversity_ratio,
        )
        self.trainer = None
        #: Steps whose evaluation was at or under the threshold, and the step of the first one above it (or None).
        self.last_good_step: int | None = None
        self.hacking_step: int | None = None

    def check_inputs(self, eval_dataset, validation: bool, eval_reward_names: list[str]) -> None:
        """Raise, naming the fix, when a watched signal has nothing to be measured on."""
        if "loss_ratio" in self.watch and eval_dataset is None:
            raise ValueError(
                "HackingMonitorCallback needs held-out data: pass eval_dataset (prompts with paired reference "
                "samples) to DDRLTrainer, or watch only 'eval_rewards' / 'diversity'."
            )
        if {"eval_rewards", "diversity"} & set(self.watch) and not validation:
            raise ValueError(
                "HackingMonitorCallback watches validation samples (eval_rewards / diversity) but there are none: set "
                "DDRLConfig.validation_prompts, or num_validation_prompts > 0 with an eval_dataset."
            )
        if "eval_rewards" in self.watch and not eval_reward_names:
            raise ValueError(
                "HackingMonitorCallback watches eval_rewards but the trainer has no eval_reward_funcs (rewards not "
                "trained on): pass eval_reward_funcs=[...] to DDRLTrainer, or drop 'eval_rewards' from watch."
            )

    @staticmethod
    def check_eval_data(eval_dataset) -> None:
        """Deprecated: `check_inputs` checks every watched signal. Raises when there is no held-out data."""
        HackingMonitorCallback().check_inputs(eval_dataset, validation=False, eval_reward_names=[])

    def bind(self, trainer) -> None:
        """Called by `DDRLTrainer` when the callback is given to it: the monitor saves through the trainer."""
        self.check_inputs(trainer.eval_dataset, trainer.validator is not None, trainer.eval_reward_names)
        self.trainer = trainer

    @property
    def last_good_path(self) -> str | None:
        if self.trainer is None or self.last_good_dir is None:
            return None
        return os.path.join(self.trainer.args.output_dir, self.last_good_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            control.should_evaluate = True

    def tripped(self, metrics: dict) -> tuple[list[str], set[str]]:
        """What tripped in `metrics` (a sentence each), and which watched signals `metrics` measured."""
        reasons, measured = [], set()
        if "loss_ratio" in self.watch:
            watched = [key for key in self.WATCHED if metrics.get(key) is not None]
            if watched:
                measured.add("loss_ratio")
                # the worst of the conditional and the guided ratio; a non-finite one is worst of all
                key = max(watched, key=lambda k: (not math.isfinite(metrics[k]), metrics[k]))
                if not metrics[key] <= self.threshold:
                    which = "guided diffusion loss" if key == "eval_guided_diffusion_loss_ratio" else "diffusion loss"
                    ratio = metrics[key]
                    reasons.append(
                        f"the held-out {which} is {ratio:.3f}× the base model's (threshold {self.threshold:.2f})"
                    )
        if "eval_rewards" in self.watch and self.trainer is not None and self.trainer.validator is not None:
            base = self.trainer.validator.base
            for name in self.trainer.eval_reward_names:
                now = metrics.get(f"eval_rewards/{name}")
                reference = base.rewards.get(name, math.nan) if base is not None else math.nan
                if now is None or not math.isfinite(reference):  # the base scored no sample: nothing to compare
                    continue
                measured.add("eval_rewards")
                drop = (reference - now) / abs(reference) if reference else reference - now
                if not drop <= self.max_eval_reward_drop:
                    reasons.append(
                        f"the evaluation reward {name!r} fell to {now:.4g} from the base model's {reference:.4g} "
                        f"(more than {self.max_eval_reward_drop:.0%})"
                    )
        ratio = metrics.get("eval_diversity_ratio")
        if "diversity" in self.watch and ratio is not None and math.isfinite(ratio):  # NaN: the base had none
            measured.add("diversity")
            if not ratio >= self.min_diversity_ratio:
                reasons.append(
                    f"the validation samples' diversity is {ratio:.2f}× the base model's (minimum "
                    f"{self.min_diversity_ratio:.2f})"
                )
        return reasons, measured

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        reasons, measured = self.tripped(metrics or {})
        if not measured:
            return
        if not reasons:
            if measured != set(self.watch):  # e.g. a validation without the held-out loss: not enough to call it good
                return
            self.last_good_step = state.global_step
            if self.last_good_path is not None:
                self.trainer.save_model(self.last_good_path)
            self.trainer.log({"hacking/detected": 0.0, "hacking/last_good_step": float(state.global_step)})
            return
        self.hacking_step = self.hacking_step if self.hacking_step is not None else state.global_step
        where = (
            f"the weights of step {self.last_good_step} are in {self.last_good_path}"
            if self.last_good_step is not None and self.last_good_path is not None
            else "no evaluation was under the threshold yet"
        )
        action = "Stopping training" if self.stop_training else "Training goes on (stop_training=False)"
        logger.warning(
            "Reward hacking suspected at step %d: %s. %s; %s. Raise data_beta to hold the model to its data.",
            state.global_step,
            "; ".join(reasons),
            action,
            where,
        )
        last_good = float(self.last_good_step) if self.last_good_step is not None else -1.0
        self.trainer.log({"hacking/detected": 1.0, "hacking/last_good_step": last_good})
        if self.stop_training:
            control.should_training_stop = True
