"""The hacking benchmark suite (issue 24): many hackable rewards on the embedded digits model, independent judges
fitted on real digits, several seeds, and per method the reward gain against every judge's drop (the frontier).

Each run is the demo's recipe (the shipped digits model, LoRA r 8, lr 1e-3, 4 prompts × 8 rollouts, T = 10, `--steps`
optimiser steps) trained on one reward with one method:

- `grpo`: no anchor (data_beta 0, kl_beta 0);
- `ddrl<β>`: the data term at data_beta β (`ddrl0.3` is the default);
- `kl<β>`: KL-regularised GRPO, the reverse KL to the base at kl_beta β (Flow-GRPO's regulariser), no data term;
- `ddrl<β>+kl<κ>`: both.

Before and after training, `--per-digit` samples of each digit (fixed prompts and seeds, stochastic DDIM as in RL
post-training) are scored by the trained reward and by every judge; the held-out diffusion-loss ratio (the paper's
signal) and the samples' within-digit diversity ratio are measured too. A judge never sees generated images while
fitted: its accuracy on the samples says whether they still look like real digits of the prompted class, which no
reward of the suite knows. Results go to `<output-dir>/results.json`, one frontier plot per reward to
`<output-dir>/frontier_<reward>.png`, a table to stdout.

    python benchmarks/bench_hacking_suite.py                       # every reward, the default methods, 3 seeds
    python benchmarks/bench_hacking_suite.py --rewards edges --methods grpo ddrl0.3 kl0.1 --seeds 0 --steps 20

On this machine (2 cores) a 100-step run takes about 2 minutes: the whole default grid (9 rewards × 8 methods ×
3 seeds) is a night's work, so run it reward by reward (`--rewards`) and merge the JSON files (`--merge`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.core.diversity import within_prompt_diversity
from ddrl_trl.demo.__main__ import RECIPE, recipe_lora
from ddrl_trl.demo.digits import (
    DigitsEvaluator,
    DigitsSampling,
    _split,
    _to_pixels,
    digits_dataset,
    ink_reward,
    load_digits_pipeline,
    sample_digits,
)
from ddrl_trl.rewards import jpeg_compressibility

DEFAULT_METHODS = ["grpo", "ddrl0.3", "ddrl0.5", "ddrl1.0", "kl0.04", "kl0.1", "kl0.2", "ddrl0.3+kl0.1"]


# ---------------------------------------------------------------------------------------------------------- rewards
def _grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, H, W) grey, float32."""
    return images.detach().float().clamp(0, 1).mean(dim=1)


def darkness(images, prompts, **kwargs):
    """1 − mean brightness: rewards erasing the strokes."""
    return (1 - _grey(images).mean(dim=(1, 2))).tolist()


def contrast(images, prompts, **kwargs):
    """The pixels' standard deviation per image: rewards hard black-and-white images."""
    return _grey(images).flatten(1).std(dim=1).tolist()


def edges(images, prompts, **kwargs):
    """Mean absolute finite-difference gradient: rewards busy, high-frequency images."""
    grey = _grey(images)
    dx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2))
    dy = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean(dim=(1, 2))
    return (dx + dy).tolist()


def thick_strokes(images, prompts, **kwargs):
    """The fraction of pixels brighter than 0.5: rewards thicker strokes (a stroke statistic)."""
    return (_grey(images) > 0.5).float().mean(dim=(1, 2)).tolist()


def left_heavy(images, prompts, **kwargs):
    """The share of the ink in the left half: a spatial bias no real digit has."""
    grey = _grey(images)
    half = grey.shape[-1] // 2
    return (grey[:, :, :half].sum(dim=(1, 2)) / grey.sum(dim=(1, 2)).clamp_min(1e-6)).tolist()


def symmetry(images, prompts, **kwargs):
    """−mean |x − mirror(x)|: rewards left-right symmetric images (an 8 or a 0 for every prompt)."""
    grey = _grey(images)
    return (-(grey - grey.flip(-1)).abs().mean(dim=(1, 2))).tolist()


def _zero_template() -> torch.Tensor:
    images8, labels = _split("train")
    return _grey(_to_pixels(images8[labels == 0])).mean(dim=0)


def zero_likeness(images, prompts, **kwargs):
    """−RMS distance to the mean real "0": a reward pushing every prompt towards one class."""
    template = _zero_template().to(images.device)
    return (-((_grey(images) - template) ** 2).mean(dim=(1, 2)).sqrt()).tolist()


REWARDS: dict[str, Callable] = {
    "ink": ink_reward,  # global intensity (the README's demo)
    "darkness": darkness,
    "jpeg_compressibility": jpeg_compressibility,
    "contrast": contrast,
    "edges": edges,
    "thick_strokes": thick_strokes,
    "left_heavy": left_heavy,
    "symmetry": symmetry,
    "zero_likeness": zero_likeness,
}


# ----------------------------------------------------------------------------------------------------------- judges
class _SklearnJudge:
    """A digit classifier fitted on the real train-split digits, read through the samples' 8×8 area-downsampling."""

    def __init__(self, classifier, features: Callable[[np.ndarray], np.ndarray]):
        images8, labels = _split("train")
        self.features = features
        self.classifier = classifier.fit(features(images8.reshape(len(images8), -1) / 16.0), labels)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        small = F.adaptive_avg_pool2d(_grey(images).unsqueeze(1).cpu(), (8, 8)).flatten(1).numpy()
        return self.classifier.predict(self.features(small))


def _gradient_features(pixels: np.ndarray) -> np.ndarray:
    """8×8 pixels and their horizontal and vertical differences: a judge that weighs strokes' edges."""
    x = pixels.reshape(-1, 8, 8)
    return np.concatenate(
        [x.reshape(len(x), -1), np.diff(x, axis=2).reshape(len(x), -1), np.diff(x, axis=1).reshape(len(x), -1)],
        axis=1,
    )


def make_judges() -> dict[str, object]:
    """Three judges of different inductive biases, none trained on generated images: the demo's logistic
    regression, a 5-nearest-neighbour vote, and an RBF SVM on pixels and their gradients."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    return {
        "logistic": DigitsEvaluator(),
        "knn": _SklearnJudge(KNeighborsClassifier(n_neighbors=5), lambda x: x),
        "svm": _SklearnJudge(SVC(C=5.0, gamma="scale"), _gradient_features),
    }


def judge_accuracy(judge, images: torch.Tensor, labels: list[int]) -> float:
    return float((judge.predict(images) == np.asarray(labels)).mean())


def real_accuracies(judges: dict) -> dict[str, float]:
    """Each judge's accuracy on the real held-out digits (what "a real digit" scores)."""
    images8, labels = _split("test")
    return {name: judge_accuracy(judge, _to_pixels(images8), list(labels)) for name, judge in judges.items()}


# ---------------------------------------------------------------------------------------------------------- methods
def method_config(method: str) -> dict[str, float]:
    """`grpo`, `ddrl<β>`, `kl<κ>` or `ddrl<β>+kl<κ>` → data_beta and kl_beta."""
    config = {"data_beta": 0.0, "kl_beta": 0.0}
    if method == "grpo":
        return config
    for part in method.split("+"):
        match = re.fullmatch(r"(ddrl|kl)(\d+(?:\.\d+)?)", part)
        if match is None:
            raise ValueError(f"Unknown method {method!r}: use grpo, ddrl<beta>, kl<beta> or ddrl<beta>+kl<beta>.")
        config["data_beta" if match[1] == "ddrl" else "kl_beta"] = float(match[2])
    return config


def measure(pipe, reward: Callable, judges: dict, opts) -> dict[str, float]:
    """The trained reward, every judge and the within-digit diversity on fixed samples of the pipeline now."""
    images, labels, prompts = sample_digits(pipe, 10, opts.per_digit, DigitsSampling(seed=1234))
    result = {"reward": float(np.mean(reward(images, prompts)))}
    result.update({f"judge/{name}": judge_accuracy(judge, images, labels) for name, judge in judges.items()})
    result["diversity"] = within_prompt_diversity(images, opts.per_digit).item()
    return result


def run(reward_name: str, method: str, seed: int, judges: dict, data, opts) -> dict:
    """Train one run; return its measurements before and after, its held-out ratio and its wall-clock."""
    train_ds, eval_ds = data
    reward = REWARDS[reward_name]
    args = DDRLConfig(
        output_dir=str(Path(opts.output_dir) / "runs" / f"{reward_name}-{method}-{seed}"),
        seed=seed,
        max_steps=opts.steps,
        learning_rate=1e-3,
        per_device_train_batch_size=RECIPE["num_generations"] * 4,
        logging_steps=max(1, opts.steps // 5),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        overwrite_output_dir=True,
        **RECIPE,
        **method_config(method),
    )
    trainer = DDRLTrainer(
        model=load_digits_pipeline(),
        reward_funcs=reward,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        peft_config=recipe_lora(),
    )
    before = measure(trainer.pipeline, reward, judges, opts)
    trainer.evaluate()  # the base's held-out loss, measured once
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    after = measure(trainer.pipeline, reward, judges, opts)
    ratio = trainer.evaluate()["eval_diffusion_loss_ratio"]
    return {
        "reward": reward_name,
        "method": method,
        "seed": seed,
        **method_config(method),
        "before": before,
        "after": after,
        "reward_gain_percent": 100 * (after["reward"] - before["reward"]) / max(abs(before["reward"]), 1e-8),
        "judge_drop_points": {name: 100 * (before[f"judge/{name}"] - after[f"judge/{name}"]) for name in judges},
        "diffusion_loss_ratio": ratio,
        "diversity_ratio": after["diversity"] / before["diversity"] if before["diversity"] > 0 else float("nan"),
        "train_seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------------------- reports
def summarise(runs: list[dict]) -> list[dict]:
    """Mean and seed-to-seed spread (sample std) per (reward, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in runs:
        groups.setdefault((entry["reward"], entry["method"]), []).append(entry)
    rows = []
    for (reward, method), entries in sorted(groups.items()):
        gains = [e["reward_gain_percent"] for e in entries]
        drops = [float(np.mean(list(e["judge_drop_points"].values()))) for e in entries]
        worst = [max(e["judge_drop_points"].values()) for e in entries]
        rows.append(
            {
                "reward": reward,
                "method": method,
                "seeds": len(entries),
                "gain": float(np.mean(gains)),
                "gain_std": float(np.std(gains, ddof=1)) if len(gains) > 1 else 0.0,
                "judge_drop": float(np.mean(drops)),
                "judge_drop_std": float(np.std(drops, ddof=1)) if len(drops) > 1 else 0.0,
                "worst_judge_drop": float(np.mean(worst)),
                "ratio": float(np.mean([e["diffusion_loss_ratio"] for e in entries])),
                "diversity_ratio": float(np.mean([e["diversity_ratio"] for e in entries])),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'reward':<22}{'method':<16}{'gain %':>12}{'judge drop':>14}{'worst':>8}{'ratio':>8}{'div.':>7}")
    for r in rows:
        print(
            f"{r['reward']:<22}{r['method']:<16}{r['gain']:>7.1f}±{r['gain_std']:<4.1f}"
            f"{r['judge_drop']:>9.1f}±{r['judge_drop_std']:<4.1f}{r['worst_judge_drop']:>8.1f}"
            f"{r['ratio']:>8.3f}{r['diversity_ratio']:>7.2f}"
        )


def plot_frontiers(rows: list[dict], output_dir: Path) -> None:
    """Per reward: the mean judge drop against the reward gain, one point per method (error bars: seed spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"grpo": "black", "ddrl": "tab:blue", "kl": "tab:orange", "both": "tab:green"}
    for reward in sorted({r["reward"] for r in rows}):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in (r for r in rows if r["reward"] == reward):
            config = method_config(r["method"])
            family = (
                "grpo"
                if r["method"] == "grpo"
                else "both"
                if config["data_beta"] and config["kl_beta"]
                else "ddrl"
                if config["data_beta"]
                else "kl"
            )
            ax.errorbar(
                r["gain"], r["judge_drop"], xerr=r["gain_std"], yerr=r["judge_drop_std"], fmt="o",
                color=colours[family],
            )  # fmt: skip
            ax.annotate(
                r["method"], (r["gain"], r["judge_drop"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.axhline(5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("reward gain (%)")
        ax.set_ylabel("mean judge drop (points)")
        ax.set_title(f"{reward}: lower right is better")
        fig.tight_layout()
        fig.savefig(output_dir / f"frontier_{reward}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--per-digit", type=int, default=12, help="judged samples per digit, before and after")
    parser.add_argument("--eval-size", type=int, default=120, help="held-out digits for the diffusion-loss ratio")
    parser.add_argument("--output-dir", default="bench-hacking-suite")
    parser.add_argument("--merge", nargs="*", default=[], help="results.json files of earlier runs to add")
    opts = parser.parse_args(argv)
    for method in opts.methods:
        method_config(method)  # refuse a misspelt method before any training
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    output_dir = Path(opts.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    judges = make_judges()
    print("judges on real held-out digits:", {k: round(v, 3) for k, v in real_accuracies(judges).items()})
    data = (digits_dataset("train"), digits_dataset("test").shuffle(seed=0).select(range(opts.eval_size)))
    runs = [entry for path in opts.merge for entry in json.loads(Path(path).read_text())["runs"]]
    for reward_name in opts.rewards:
        for method in opts.methods:
            for seed in opts.seeds:
                print(f"=== {reward_name} · {method} · seed {seed}", flush=True)
                runs.append(run(reward_name, method, seed, judges, data, opts))
                rows = summarise(runs)
                (output_dir / "results.json").write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
    rows = summarise(runs)
    print_table(rows)
    plot_frontiers(rows, output_dir)


if __name__ == "__main__":
    main()
