"""The embedded default: DDRL vs the same run without its data term, on a real digits model, in minutes on a CPU.

    ddrl-trl-demo [--steps 100] [--cfg-scale 1.0] [--output-dir ddrl-demo-output]      (or: python -m ddrl_trl.demo)

Both runs start from the shipped digits pipeline (`ddrl_trl.demo.digits`), train the same LoRA for the same steps
with the same seed on the hackable ink reward, and differ only in `data_beta`. Every `--eval-every` steps each run
reports its held-out diffusion loss against the base model (the paper's hacking signal, > 1.10 = hacking; with
`--cfg-scale` > 1 also the guided output's, which is what guided hacking moves) and an independent judge's accuracy
on fresh samples (sampled as the rollouts are: with `--cfg-scale` > 1, guided). The report: a table, `report.png`
(curves of both runs), image grids before and after, `results.json`, and TensorBoard logs under each run's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import TrainerCallback

from .. import DDRLConfig, DDRLTrainer
from ..config import UNGUIDED_DATA_BETA, default_data_beta
from .digits import (
    DigitsEvaluator,
    digit_prompt,
    digits_dataset,
    evaluate_digits_pipeline,
    ink_reward,
    judge_reward,
    load_digits_pipeline,
)

HACKING_RATIO = 1.10


#: The demo's training recipe, shared by every run on the digits model (the demo's and the benchmarks'): 8 rollouts
#: per prompt, T = 10, every other step trained, a constant learning rate, the held-out loss over 4 noise draws.
RECIPE = dict(
    warmup_steps=0,
    lr_scheduler_type="constant",
    num_generations=8,
    num_inference_steps=10,
    train_step_stride=2,
    per_device_eval_batch_size=120,
    eval_noise_draws=4,
    dataloader_pin_memory=False,
)


def recipe_lora() -> LoraConfig:
    """The demo's adapter: LoRA r 8, alpha 8."""
    return LoraConfig(r=8, lora_alpha=8)


class _DemoProbe(TrainerCallback):
    """After each evaluation, samples the current model and records what the judge and the trained reward say."""

    def __init__(self, trainer_ref: dict, evaluator: DigitsEvaluator, per_digit: int, reward=ink_reward):
        self.trainer_ref, self.evaluator, self.per_digit, self.reward = trainer_ref, evaluator, per_digit, reward
        self.history: list[dict] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if "eval_diffusion_loss_ratio" not in (metrics or {}):  # a validation without the held-out loss
            return
        trainer = self.trainer_ref["trainer"]
        judged = evaluate_digits_pipeline(
            trainer.pipeline,
            self.evaluator,
            args.num_inference_steps,
            self.per_digit,
            guidance_scale=args.cfg_scale,
            rewards={"reward": self.reward},
        )
        entry = {
            "step": state.global_step,
            "reward": judged["reward"],  # the trained reward on the judge's fixed prompts and seeds
            "diffusion_loss_ratio": metrics["eval_diffusion_loss_ratio"],
            "accuracy": judged["accuracy"],
            "ink": judged["ink"],
            "data_beta": trainer.data_beta,
            # the validation grid's (fixed prompts and seeds, 4 per digit): its diversity, and the judge on it
            "diversity_ratio": metrics["eval_diversity_ratio"],
            "validation_judge": metrics["eval_rewards/judge"],
        }
        if "eval_guided_diffusion_loss_ratio" in metrics:
            entry["guided_diffusion_loss_ratio"] = metrics["eval_guided_diffusion_loss_ratio"]
        self.history.append(entry)


def watched_ratio(entry: dict) -> float:
    """The ratio the verdict reads: the higher of the conditional and (under guidance) the guided output's."""
    return max(entry["diffusion_loss_ratio"], entry.get("guided_diffusion_loss_ratio", 0.0))


def _grid(pipe, path: Path, guidance_scale: float, per_digit: int = 6, steps: int = 10) -> None:
    from diffusers.utils import make_image_grid

    prompts = [digit_prompt(d) for _ in range(per_digit) for d in range(10)]
    images = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        eta=1.0,
        output_type="pil",
        generator=torch.Generator().manual_seed(1),
    ).images
    make_image_grid([im.resize((48, 48), 0) for im in images], rows=per_digit, cols=10).save(path)


def run_one(name: str, data_beta: float, opts, evaluator, train_ds, eval_ds, reward=ink_reward, **config) -> dict:
    """Train one run on `reward` (`config`: more `DDRLConfig` fields); return its evaluation history."""
    output_dir = Path(opts.output_dir) / name
    args = DDRLConfig(
        **config,
        output_dir=str(output_dir),
        seed=opts.seed,
        max_steps=opts.steps,
        learning_rate=opts.learning_rate,
        data_beta=data_beta,
        cfg_scale=opts.cfg_scale,
        per_device_train_batch_size=RECIPE["num_generations"] * opts.prompts_per_step,
        eval_strategy="steps",
        eval_steps=opts.eval_every,
        logging_steps=opts.eval_every,
        log_sample_images_steps=opts.eval_every,
        report_to=["tensorboard"],
        save_strategy="no",
        validation_prompts=[digit_prompt(d) for d in range(10)],
        validation_images_per_prompt=opts.validation_per_digit,
        run_name=name,
        overwrite_output_dir=True,  # the demo regenerates its own output folder on every run
        **RECIPE,
    )
    trainer_ref: dict = {}
    probe = _DemoProbe(trainer_ref, evaluator, opts.per_digit, reward)
    trainer = DDRLTrainer(
        model=load_digits_pipeline(),
        reward_funcs=reward,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        peft_config=recipe_lora(),
        callbacks=[probe],
        eval_reward_funcs=[judge_reward(evaluator)],
    )
    trainer_ref["trainer"] = trainer
    print(f"\n=== {name}: data_beta={data_beta}, cfg_scale={opts.cfg_scale} ===", flush=True)
    trainer.evaluate()  # step 0: the base model
    trainer.train()
    if probe.history[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    trainer.save_model()
    _grid(trainer.pipeline, Path(opts.output_dir) / f"grid_after_{name}.png", opts.cfg_scale)
    grids = {step: str(output_dir / "validation" / f"step-{step:06d}.png") for step in (0, trainer.state.global_step)}
    return {"data_beta": data_beta, "history": probe.history, "validation_grids": grids}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(19, 9.5), gridspec_kw={"height_ratios": [1, 1.3]})
    panels = [
        ("reward", "ink reward (trained on)"),
        ("diffusion_loss_ratio", "held-out diffusion loss / base"),
        ("diversity_ratio", "validation samples' diversity / base"),
        ("accuracy", "independent judge: accuracy"),
    ]
    for ax, (key, title) in zip(axes[0], panels):
        for name, result in results.items():
            steps = [h["step"] for h in result["history"]]
            line = ax.plot(
                steps,
                [h[key] for h in result["history"]],
                marker="o",
                label=f"{name} (data_beta={result['data_beta']})",
            )[0]
            if key == "diffusion_loss_ratio" and "guided_diffusion_loss_ratio" in result["history"][0]:
                ax.plot(
                    steps,
                    [h["guided_diffusion_loss_ratio"] for h in result["history"]],
                    marker="x",
                    linestyle=":",
                    color=line.get_color(),
                    label=f"{name}: guided output",
                )
        if key == "diffusion_loss_ratio":
            ax.axhline(HACKING_RATIO, color="red", linestyle="--", label="hacking threshold 1.10")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # the validation grids (rows: digits 0-9; fixed seeds): the base, then each run at its last step
    first = next(iter(results.values()))
    shown = [("base model (step 0)", first["validation_grids"][0])]
    shown += [
        (f"{name}, step {max(r['validation_grids'])}", r["validation_grids"][max(r["validation_grids"])])
        for name, r in results.items()
    ]
    for ax in axes[1]:
        ax.axis("off")
    for ax, (title, grid) in zip(axes[1], shown):
        ax.imshow(plt.imread(grid), interpolation="nearest")
        ax.set_title(f"validation grid: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options; `data_beta` resolved (the DDRL default, or the guided one with `--cfg-scale` > 1)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument(
        "--data-beta",
        type=float,
        default=None,
        help=f"DDRL run's data_beta (default: DDRLConfig's, {UNGUIDED_DATA_BETA}; with --cfg-scale 2, "
        f"{default_data_beta(2.0):g})",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="LoRA learning rate of both runs")
    parser.add_argument("--prompts-per-step", type=int, default=4, help="groups of 8 rollouts per step")
    parser.add_argument("--per-digit", type=int, default=10, help="judge samples per digit at each evaluation")
    parser.add_argument(
        "--validation-per-digit", type=int, default=4, help="validation grid samples per digit (a row per digit)"
    )
    parser.add_argument("--eval-size", type=int, default=120, help="held-out digits for the diffusion loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="ddrl-demo-output")
    parser.add_argument(
        "--cfg-scale", type=float, default=1.0, help="classifier-free guidance of rollouts and samples"
    )
    opts = parser.parse_args(argv)
    if opts.data_beta is None:  # DDRLConfig's default, the stronger anchor under guidance (docs/concepts.md)
        opts.data_beta = default_data_beta(opts.cfg_scale)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    evaluator = DigitsEvaluator()
    train_ds = digits_dataset("train")
    eval_ds = digits_dataset("test").shuffle(seed=0).select(range(opts.eval_size))
    _grid(load_digits_pipeline(), out / "grid_before.png", opts.cfg_scale)
    results = {
        "baseline": run_one("baseline", 0.0, opts, evaluator, train_ds, eval_ds),
        "ddrl": run_one("ddrl", opts.data_beta, opts, evaluator, train_ds, eval_ds),
    }
    plot(results, out / "report.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))

    base = results["ddrl"]["history"][0]
    guided = "guided_diffusion_loss_ratio" in base
    print(f"\njudge accuracy on real held-out digits: {evaluator.test_accuracy():.3f}")
    guided_header = f"{'guided ratio':>14}" if guided else ""
    print(f"{'run':<10}{'step':>6}{'reward':>9}{'loss ratio':>12}{guided_header}{'diversity':>11}{'judge acc.':>12}")
    for name, result in results.items():
        for h in result["history"]:
            guided_ratio = f"{h['guided_diffusion_loss_ratio']:>14.3f}" if guided else ""
            print(
                f"{name:<10}{h['step']:>6}{h['reward']:>9.4f}{h['diffusion_loss_ratio']:>12.3f}{guided_ratio}"
                f"{h['diversity_ratio']:>11.3f}{h['accuracy']:>12.3f}"
            )
    final = {name: result["history"][-1] for name, result in results.items()}
    hacked = watched_ratio(final["baseline"]) > HACKING_RATIO
    held = watched_ratio(final["ddrl"]) <= HACKING_RATIO and final["ddrl"]["reward"] > base["reward"]
    which = "loss ratio (higher of conditional and guided)" if guided else "loss ratio"
    print(
        f"\nbaseline (data_beta=0): {which} {watched_ratio(final['baseline']):.3f} "
        f"({'HACKED' if hacked else 'not hacked'}), judge accuracy {base['accuracy']:.2f} → "
        f"{final['baseline']['accuracy']:.2f}"
    )
    print(
        f"DDRL (data_beta={opts.data_beta}): reward {base['reward']:.4f} → {final['ddrl']['reward']:.4f}, {which} "
        f"{watched_ratio(final['ddrl']):.3f} ({'held under' if held else 'NOT under'} {HACKING_RATIO}), "
        f"judge accuracy {base['accuracy']:.2f} → {final['ddrl']['accuracy']:.2f}"
    )
    print(
        f"\nwrote {out / 'report.png'} (curves and validation grids), grid_before.png, grid_after_*.png, "
        f"results.json in {time.perf_counter() - start:.0f}s"
    )
    return 0 if hacked and held else 1


if __name__ == "__main__":
    raise SystemExit(main())
