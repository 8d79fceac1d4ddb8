"""`HackingMonitorCallback`: watch the paper's reward-hacking signal while training, and act on it.

The signal (arXiv 2512.04332, §5): a post-trained model whose diffusion loss on held-out data is more than 10 % above
the base model's is hacking the reward. `DDRLTrainer.evaluate()` measures that ratio
(`eval_diffusion_loss_ratio`, seeded draws, the base model measured on the same draws); this callback asks for it
every `eval_steps` optimiser steps, keeps the weights of the last step under the threshold, warns when the ratio
passes it, and optionally stops training there. Under classifier-free guidance it watches the guided output's ratio
(`eval_guided_diffusion_loss_ratio`) as well: guidance amplifies a drift the conditional model's ratio does not show
(docs/concepts.md).
"""

from __future__ import annotations

import logging
import math
import os

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class HackingMonitorCallback(TrainerCallback):
    """Evaluate every `eval_steps` steps; warn (and optionally stop) when the held-out loss ratio passes `threshold`
    (under guidance: the conditional or the guided output's ratio, whichever is higher).

    Pass it to `DDRLTrainer(callbacks=[HackingMonitorCallback(...)])`, with an `eval_dataset` of held-out prompts and
    paired reference samples. After each evaluation at or under the threshold, the weights are saved (atomically, in
    diffusers' format) to `<output_dir>/<last_good_dir>`, so a run stopped for hacking, or one you stop yourself,
    keeps its last good model. Logged: `hacking/last_good_step` and `hacking/detected` (0 or 1).

    Args:
        threshold: the ratio above which the run counts as hacking (the paper's 1.10).
        eval_steps: how often to measure, in optimiser steps.
        stop_training: stop the run at the first evaluation above `threshold`.
        last_good_dir: folder (under `output_dir`) for the last good weights; None to not save them.
    """

    #: The ratios watched, when `evaluate()` reports them.
    WATCHED = ("eval_diffusion_loss_ratio", "eval_guided_diffusion_loss_ratio")

    def __init__(
        self,
        threshold: float = 1.10,
        eval_steps: int = 50,
        stop_training: bool = False,
        last_good_dir: str | None = "last-good",
    ):
        if threshold <= 1.0:
            raise ValueError(
                f"threshold must be > 1 (a ratio to the base model's loss; the paper uses 1.10), got {threshold}."
            )
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be ≥ 1, got {eval_steps}.")
        self.threshold, self.eval_steps = threshold, eval_steps
        self.stop_training, self.last_good_dir = stop_training, last_good_dir
        self.trainer = None
        #: Steps whose evaluation was at or under the threshold, and the step of the first one above it (or None).
        self.last_good_step: int | None = None
        self.hacking_step: int | None = None

    @staticmethod
    def check_eval_data(eval_dataset) -> None:
        """Raise, naming the fix, when there is no held-out data to measure the ratio on."""
        if eval_dataset is None:
            raise ValueError(
                "HackingMonitorCallback needs held-out data: pass eval_dataset (prompts with paired reference "
                "samples) to DDRLTrainer."
            )

    def bind(self, trainer) -> None:
        """Called by `DDRLTrainer` when the callback is given to it: the monitor saves through the trainer."""
        self.check_eval_data(trainer.eval_dataset)
        self.trainer = trainer

    @property
    def last_good_path(self) -> str | None:
        if self.trainer is None or self.last_good_dir is None:
            return None
        return os.path.join(self.trainer.args.output_dir, self.last_good_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        watched = [key for key in self.WATCHED if (metrics or {}).get(key) is not None]
        if not watched:
            return
        # the worst of the conditional and the guided ratio; a non-finite one is worst of all
        key = max(watched, key=lambda k: (not math.isfinite(metrics[k]), metrics[k]))
        ratio = metrics[key]
        if ratio <= self.threshold:
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
            "Reward hacking suspected at step %d: the held-out %s is %.3f× the base model's (threshold "
            "%.2f). %s; %s. Raise data_beta to hold the model to its data.",
            state.global_step,
            "guided diffusion loss" if key == "eval_guided_diffusion_loss_ratio" else "diffusion loss",
            ratio,
            self.threshold,
            action,
            where,
        )
        last_good = float(self.last_good_step) if self.last_good_step is not None else -1.0
        self.trainer.log({"hacking/detected": 1.0, "hacking/last_good_step": last_good})
        if self.stop_training:
            control.should_training_stop = True
