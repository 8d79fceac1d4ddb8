"""Adaptive data_beta (`DDRLConfig.target_loss_ratio`) against the fixed default, on the embedded digits model.

For each reward, the same LoRA run as `ddrl-trl-demo` (same base, seed, steps and batch) is trained with the fixed
default data_beta ("fixed") and with the controller holding the data term's loss ratio at `--target`, starting from
that same default ("adaptive"); "grpo", the run without a data term, shows the reward is hackable (`--runs`).
Every `--eval-every` steps each run reports the trained reward and the digit judge's accuracy on fixed prompts and
seeds, and the held-out diffusion-loss ratio (the paper's hacking signal). Numbers go to stdout and
`<output-dir>/results.json`; docs/concepts.md has them.

    python benchmarks/bench_adaptive_beta.py --steps 100 --target 1.05 --rewards ink jpeg_compressibility
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ddrl_trl.config import default_data_beta
from ddrl_trl.demo.__main__ import run_one
from ddrl_trl.demo.digits import DigitsEvaluator, digits_dataset, ink_reward
from ddrl_trl.rewards import resolve_reward


def _reward(name: str):
    return ink_reward if name == "ink" else resolve_reward(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=1.05, help="target_loss_ratio of the adaptive runs")
    parser.add_argument("--adapt-rate", type=float, default=0.05, help="data_beta_adapt_rate of the adaptive runs")
    parser.add_argument("--rewards", nargs="+", default=["ink", "jpeg_compressibility"])
    parser.add_argument("--runs", nargs="+", default=["fixed", "adaptive"], choices=["grpo", "fixed", "adaptive"])
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--validation-per-digit", type=int, default=4, help="validation grid samples per digit")
    parser.add_argument("--eval-size", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--output-dir", default="bench-adaptive-output")
    opts = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    evaluator = DigitsEvaluator()
    train_ds = digits_dataset("train")
    eval_ds = digits_dataset("test").shuffle(seed=0).select(range(opts.eval_size))
    default = default_data_beta(opts.cfg_scale)
    results: dict[str, dict] = {}
    for reward_name in opts.rewards:
        reward = _reward(reward_name)
        settings = {
            "grpo": (0.0, {}),
            "fixed": (default, {}),
            "adaptive": (default, {"target_loss_ratio": opts.target, "data_beta_adapt_rate": opts.adapt_rate}),
        }
        for kind in opts.runs:
            data_beta, extra = settings[kind]
            name = f"{reward_name}-{kind}"
            began = time.perf_counter()
            results[name] = run_one(name, data_beta, opts, evaluator, train_ds, eval_ds, reward=reward, **extra)
            results[name]["seconds"] = time.perf_counter() - began
            (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\n{'run':<30}{'step':>6}{'reward':>10}{'loss ratio':>12}{'judge':>8}{'data_beta':>11}")
    for name, result in results.items():
        for h in result["history"]:
            print(
                f"{name:<30}{h['step']:>6}{h['reward']:>10.4f}{h['diffusion_loss_ratio']:>12.3f}"
                f"{h['accuracy']:>8.2f}{h['data_beta']:>11.4f}"
            )
    print("\nreward gain over the base, final held-out ratio (max over evaluations), judge accuracy base → final:")
    for name, result in results.items():
        history = result["history"]
        gain = history[-1]["reward"] - history[0]["reward"]
        worst = max(h["diffusion_loss_ratio"] for h in history)
        print(
            f"{name:<30} gain {gain:+.4f}  ratio {history[-1]['diffusion_loss_ratio']:.3f} (max {worst:.3f})  "
            f"judge {history[0]['accuracy']:.2f} → {history[-1]['accuracy']:.2f}  ({result['seconds']:.0f} s)"
        )


if __name__ == "__main__":
    main()
