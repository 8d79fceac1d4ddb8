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

from ..config import _as_integer, _is_real

logger = logging.getLogger(__name__)

#: The signals the monitor can watch.
SIGNALS = ("loss_ratio", "eval_rewards", "diversity")


class HackingMonitorCallback(TrainerCallback):
    """Evaluate every `eval_steps` steps; warn (and optionally stop) when a watched signal trips:

    - `"loss_ratio"`: the held-out diffusion-loss ratio passes `threshold` (under guidance: the conditional or the
      guided output's ratio, whichever is higher; a non-finite one counts as the worst);
    - `"eval_rewards"`: an evaluation reward (the trainer's `eval_reward_funcs`, not trained on) falls by more than
      `max_eval_reward_drop` of the base model's value on the same validation seeds, (base − now) / |base|, or it
      scored the base model's samples but none of the model's (a judge that can no longer score the policy's images
      is itself a sign of hacking: they stopped looking like what it judges);
    - `"diversity"`: the validation samples' within-prompt diversity falls under `min_diversity_ratio` of the base
      model's (`eval_diversity_ratio`).

    Pass it to `DDRLTrainer(callbacks=[HackingMonitorCallback(...)])`; `"loss_ratio"` needs an `eval_dataset` of
    held-out prompts and paired reference samples, the other two need validation prompts (`validation_prompts` or
    `num_validation_prompts`), and `"eval_rewards"` needs `eval_reward_funcs`. After each evaluation where nothing
    tripped, the weights are saved (atomically, in diffusers' format) to `<output_dir>/<last_good_dir>`, so a run
    stopped for hacking, or one you stop yourself, keeps its last good model. Logged: `hacking/last_good_step`,
    `hacking/detected` (0 or 1) and `hacking/unmeasured` (how many watched signals the evaluation could not measure).

    A watched signal the evaluation should measure but cannot, for want of a base value to compare with — every
    evaluation score of the base model's samples None/NaN, a base model without within-prompt diversity — is never
    taken for good: it is warned about (naming the signal and why), counted in `hacking/unmeasured`, and that
    evaluation does not move last-good.

    Args:
        threshold: the loss ratio above which the run counts as hacking (the paper's 1.10); finite, > 1.
        eval_steps: how often to measure, in optimiser steps: a whole number ≥ 1 (an integral float such as 10.0,
            as YAML may give it, is taken as 10).
        stop_training: stop the run at the first evaluation where a signal trips.
        last_good_dir: folder (under `output_dir`) for the last good weights; None to not save them. Checked to be
            writable when the trainer is built.
        watch: which of `SIGNALS` decide ("loss_ratio", "eval_rewards", "diversity"): one name, or a list, tuple or
            set of them.
        max_eval_reward_drop: the largest relative fall of an evaluation reward below the base model's; finite, > 0.
        min_diversity_ratio: the smallest diversity, as a fraction of the base model's; in (0, 1).
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
        if not (_is_real(threshold) and math.isfinite(threshold) and threshold > 1.0):
            raise ValueError(
                f"threshold must be > 1 and finite (a ratio to the base model's held-out loss; the paper uses "
                f"1.10), got {threshold!r}: set e.g. threshold=1.10."
            )
        steps = _as_integer(eval_steps)
        if steps is None or steps < 1:
            raise ValueError(
                f"eval_steps must be a whole number ≥ 1 (optimiser steps between evaluations), got {eval_steps!r}: "
                f"set e.g. eval_steps=50."
            )
        eval_steps = steps
        if isinstance(watch, str):
            watch = (watch,)
        elif isinstance(watch, (list, tuple)):
            watch = tuple(watch)
        elif isinstance(watch, (set, frozenset)):
            watch = tuple(sorted(watch, key=lambda w: (SIGNALS.index(w) if w in SIGNALS else len(SIGNALS), str(w))))
        else:
            raise ValueError(
                f"watch must name one or more of {SIGNALS} (a string, or a list, tuple or set of them), got {watch!r}."
            )
        unknown = [w for w in watch if w not in SIGNALS]
        if unknown or not watch:
            raise ValueError(f"watch must name one or more of {SIGNALS}, got {watch!r}.")
        if not (_is_real(max_eval_reward_drop) and 0 < max_eval_reward_drop < math.inf):
            raise ValueError(
                f"max_eval_reward_drop must be a finite number > 0 (the largest relative fall of an evaluation "
                f"reward, e.g. 0.10 for 10 %), got {max_eval_reward_drop!r}."
            )
        if not (_is_real(min_diversity_ratio) and 0 < min_diversity_ratio < 1):
            raise ValueError(
                f"min_diversity_ratio must be a number in (0, 1) (a fraction of the base model's diversity, e.g. "
                f"0.5), got {min_diversity_ratio!r}."
            )
        if last_good_dir is not None and (
            not isinstance(last_good_dir, (str, os.PathLike)) or os.path.normpath(os.fspath(last_good_dir)) == "."
        ):
            raise ValueError(
                f"last_good_dir must name a folder under output_dir (e.g. 'last-good'), or be None to not keep the "
                f"last good weights, got {last_good_dir!r}: the weights would be written over output_dir itself."
            )
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
        #: Steps whose evaluation could not measure a watched signal (`hacking/unmeasured` > 0).
        self.unmeasured_steps: list[int] = []

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

    def bind(self, trainer) -> None:
        """Called by `DDRLTrainer` when the callback is given to it: the monitor saves through the trainer. Checks,
        before any training, that the last good weights can be written under `output_dir` (on the saving process)."""
        self.check_inputs(trainer.eval_dataset, trainer.validator is not None, trainer.eval_reward_names)
        if self.last_good_dir is not None and getattr(trainer.args, "should_save", True):
            from ..checkpoints.resume import (
                check_output_dir_writable,  # here: resume imports diffusers, the trainer did already
            )

            check_output_dir_writable(
                os.path.join(trainer.args.output_dir, os.fspath(self.last_good_dir)),
                setting=f"last_good_dir (--hacking_last_good_dir), under output_dir (now {self.last_good_dir!r}), or "
                f"None to not keep them",
                lost="HackingMonitorCallback's last good weights would be lost at the first good evaluation",
                keep_created=False,
            )
        self.trainer = trainer

    def warn_if_hacked(self, output_dir: str, step: int, global_step: int) -> None:
        """Warn when the weights of `step` being saved to `output_dir` (at `global_step`) are from after this monitor
        detected reward hacking, and are not the last good ones, naming the last good weights: a hacked model is
        never saved silently."""
        if self.hacking_step is None:
            return
        good = self.last_good_path
        if good is not None and os.path.abspath(output_dir) == os.path.abspath(good):
            return  # the monitor saving the last good weights
        if self.last_good_step is not None and self.last_good_step >= step:
            return  # these weights are the last good ones
        last_good = (
            f"the last good weights (step {self.last_good_step}) are in {good}"
            if self.last_good_step is not None and good is not None
            else "no evaluation before it was good, so there are no last good weights"
        )
        logger.warning(
            "Saving to %s the weights of step %d, from after reward hacking was detected at step %d "
            "(HackingMonitorCallback): %s.",
            output_dir,
            global_step,
            self.hacking_step,
            last_good,
        )

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
        reasons, measured, _ = self.assess(metrics)
        return reasons, measured

    def assess(self, metrics: dict) -> tuple[list[str], set[str], list[str]]:
        """What tripped in `metrics` (a sentence each), which watched signals `metrics` measured, and which it should
        have measured but could not (a sentence each, naming the signal and why). A signal an evaluation does not
        report at all (the held-out loss in a validation alone) is neither."""
        reasons, measured, unmeasured = [], set(), []
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
            compared, missing = 0, []
            for name in self.trainer.eval_reward_names:
                now = metrics.get(f"eval_rewards/{name}")
                if now is None:  # not a validation: nothing to measure here
                    continue
                if metrics.get(f"eval_rewards/{name}/failed"):  # it raised or broke its contract: no verdict
                    missing.append(f"{name!r} failed on the validation samples (see the warning naming it)")
                    continue
                reference = base.rewards.get(name, math.nan) if base is not None else math.nan
                if not _finite(reference):  # nothing to compare with
                    whose = (
                        "neither the model's nor the base model's" if not _finite(now) else "none of the base model's"
                    )
                    missing.append(f"{name!r} scored {whose} validation samples (every score None, NaN or ±inf)")
                    continue
                if not _finite(now):  # the judge scored the base's samples but cannot score the model's: hacking
                    compared += 1
                    reasons.append(
                        f"the evaluation reward {name!r} scored none of the model's validation samples (it scored the "
                        f"base model's: {reference:.4g})"
                        if not (_is_real(now) and math.isinf(now))
                        else f"the evaluation reward {name!r} is {now} on the model's validation samples (not a "
                        f"finite number; the base model's: {reference:.4g})"
                    )
                    continue
                compared += 1
                drop = (reference - now) / abs(reference) if reference else reference - now
                if not drop <= self.max_eval_reward_drop:
                    reasons.append(
                        f"the evaluation reward {name!r} fell to {now:.4g} from the base model's {reference:.4g} "
                        f"(more than {self.max_eval_reward_drop:.0%})"
                    )
            if missing:  # one reward not compared is enough not to call the evaluation good
                unmeasured.append(f"eval_rewards: {'; '.join(missing)}")
            elif compared:
                measured.add("eval_rewards")
        ratio = metrics.get("eval_diversity_ratio")
        if "diversity" in self.watch and ratio is not None:
            diversity = metrics.get("eval_diversity")
            if _finite(ratio):
                measured.add("diversity")
                if not ratio >= self.min_diversity_ratio:
                    reasons.append(
                        f"the validation samples' diversity is {ratio:.2f}× the base model's (minimum "
                        f"{self.min_diversity_ratio:.2f})"
                    )
            elif diversity is not None and not _finite(diversity):  # the model's samples themselves are broken
                measured.add("diversity")
                reasons.append(f"the validation samples' diversity is {diversity} (not a finite number)")
            else:  # NaN: the base model's samples of a prompt were all the same
                unmeasured.append(
                    "diversity: the base model's validation samples have no within-prompt diversity to compare with "
                    "(eval_diversity_ratio is NaN)"
                )
        return reasons, measured, unmeasured

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        reasons, measured, unmeasured = self.assess(metrics or {})
        if not measured and not unmeasured:
            return
        last_good = float(self.last_good_step) if self.last_good_step is not None else -1.0
        if unmeasured:
            self.unmeasured_steps.append(state.global_step)
            logger.warning(
                "HackingMonitorCallback could not measure a watched signal at step %d: %s. This evaluation is not "
                "counted as good (last good step: %s); check the evaluation rewards and validation prompts.",
                state.global_step,
                "; ".join(unmeasured),
                self.last_good_step if self.last_good_step is not None else "none yet",
            )
        if not reasons:
            if unmeasured:
                self.trainer.log(
                    {
                        "hacking/detected": 0.0,
                        "hacking/unmeasured": float(len(unmeasured)),
                        "hacking/last_good_step": last_good,
                    },
                    measurement=True,
                )
                return
            if measured != set(self.watch):  # e.g. a validation without the held-out loss: not enough to call it good
                return
            self.last_good_step = state.global_step
            if self.last_good_path is not None:
                self.trainer.save_model(self.last_good_path)
            self.trainer.log(
                {
                    "hacking/detected": 0.0,
                    "hacking/unmeasured": 0.0,
                    "hacking/last_good_step": float(state.global_step),
                },
                measurement=True,
            )
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
        self.trainer.log(
            {
                "hacking/detected": 1.0,
                "hacking/unmeasured": float(len(unmeasured)),
                "hacking/last_good_step": last_good,
            },
            measurement=True,
        )
        if self.stop_training:
            control.should_training_stop = True


def _finite(value) -> bool:
    return _is_real(value) and math.isfinite(value)
