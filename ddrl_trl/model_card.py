"""The model card `DDRLTrainer.push_to_hub()` uploads: diffusers metadata, how to load the weights, the rewards, the
training configuration, sample images, and the reward and diffusion-loss curves.

The card is built on diffusers' training-card template and `populate_model_card` (so `library_name: diffusers` and
the layout match cards from diffusers' own training scripts), with `huggingface_hub.ModelCard`. A README.md the user
wrote in `output_dir` is never overwritten: only cards carrying `CARD_MARKER` are regenerated.
"""

from __future__ import annotations

import json
import os

from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
from huggingface_hub import ModelCard, ModelCardData

from .rewards import to_pil
from .tracking import still_images

CARD_MARKER = "<!-- written by ddrl-trl: regenerated on each push -->"
PAPER = "https://arxiv.org/abs/2512.04332"
SAMPLES_FILE = "samples.png"
CURVES_FILE = "training_curves.png"
VALIDATION_FILE = "validation.png"
#: Curves drawn in the card: (log key, label). Eval keys appear only when `evaluate()` ran.
CURVES = (
    ("reward", "reward (trained on)"),
    ("loss/data", "data term: diffusion loss on reference data"),
    ("eval_diffusion_loss_ratio", "held-out diffusion loss / base (> 1.10: hacking)"),
    ("eval_guided_diffusion_loss_ratio", "held-out guided-output loss / base's (> 1.10: hacking)"),
    ("eval_diversity_ratio", "validation samples' diversity / base's"),
    ("data_beta", "data_beta (adaptive with target_loss_ratio)"),
)
#: DDRLConfig fields shown in the card's configuration block.
CONFIG_FIELDS = (
    "num_generations",
    "num_inference_steps",
    "eta",
    "flow_noise_level",
    "resolution",
    "num_frames",
    "cfg_scale",
    "negative_prompt",
    "negative_prompt_column",
    "guidance_scale",
    "train_step_stride",
    "train_step_indices",
    "reward_weights",
    "multi_objective_aggregation",
    "reward_clip",
    "scale_rewards",
    "advantage_clip",
    "epsilon",
    "data_beta",
    "target_loss_ratio",
    "data_noise",
    "data_timesteps",
    "data_prompt_dropout",
    "kl_beta",
    "ema_decay",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "adam_beta2",
    "max_grad_norm",
    "bf16",
    "seed",
    "num_iterations",
    "overlap_rewards",
)


def _guidance_note(trainer) -> list[str]:
    """Under guided rollouts, how to sample as the rewards judged during training (else nothing)."""
    args, adapter = trainer.args, trainer.adapter
    if args.cfg_scale == 1:
        return []
    call = f"{adapter.cfg_call_argument}={adapter.pipeline_guidance_scale(args.cfg_scale):g}"
    if args.negative_prompt_column is not None:
        negative = f" and per-prompt negative prompts (dataset column `{args.negative_prompt_column}`)"
        call += ", " + adapter.negative_prompt_call("<your negative prompts>")
    else:
        prompt = args.negative_prompt if args.negative_prompt is not None else adapter.default_negative_prompt
        negative = f" and the negative prompt {prompt!r}" if prompt is not None else ""
        if prompt is not None:
            call += ", " + adapter.negative_prompt_call(repr(prompt))
    return [
        f"Trained on rollouts with classifier-free guidance {args.cfg_scale:g}{negative}: sample it with `{call}` to "
        f"get the images the rewards were raised on.",
        "",
    ]


def write_model_card(
    trainer,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
) -> str | None:
    """Write `README.md` (and `samples.png`, `training_curves.png`) into `trainer.args.output_dir`; returns the card
    path, or None when a README.md of the user's own is there (left untouched).

    `model_name` titles the card (default: the output folder's name); `dataset_name` (the reference data) goes into
    the card's metadata and text; the tags are the trainer's `_tag_names`, the task, `lora` or `full-fine-tune`, and
    `tags`."""
    output_dir = trainer.args.output_dir
    path = os.path.join(output_dir, "README.md")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            if CARD_MARKER not in file.read():
                return None
        os.remove(path)  # ours: regenerated below
    os.makedirs(output_dir, exist_ok=True)
    has_samples = _save_samples(trainer, os.path.join(output_dir, SAMPLES_FILE))
    has_curves = _save_curves(trainer.state.log_history, os.path.join(output_dir, CURVES_FILE))
    widget = _save_validation(trainer, output_dir)
    card = ModelCard.from_template(
        card_data=ModelCardData(
            license=license,
            library_name="diffusers",
            inference=True,
            base_model=trainer.base_model_id,
            datasets=[dataset_name] if dataset_name else None,
            widget=widget,
        ),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=_description(trainer, has_samples, has_curves, model_name, dataset_name),
    )
    kind = "text-to-video" if trainer.adapter.num_frames else "text-to-image"
    family_tags = [*trainer._tag_names, kind, "lora" if trainer.is_lora else "full-fine-tune"]
    card = populate_model_card(card, tags=family_tags + [t for t in (tags or []) if t not in family_tags])
    card.save(path)
    return path


def _description(
    trainer, has_samples: bool, has_curves: bool, model_name: str | None, dataset_name: str | None
) -> str:
    args, base = trainer.args, trainer.base_model_id or "<base model>"
    what = "LoRA adapter" if trainer.is_lora else f"fine-tuned `{trainer.adapter.denoiser_name}`"
    pipeline_class = type(trainer.pipeline).__name__
    revision = (args.model_init_kwargs or {}).get("revision")
    base_args = f'"{base}"' + (f', revision="{revision}"' if revision not in (None, "main") else "")
    if trainer.is_lora:
        usage = f'pipe = {pipeline_class}.from_pretrained({base_args})\npipe.load_lora_weights("<this repo>")'
    else:
        denoiser_class = type(trainer.adapter.denoiser).__name__
        usage = (
            f'{trainer.adapter.denoiser_name} = {denoiser_class}.from_pretrained("<this repo>", '
            f'subfolder="{trainer.adapter.denoiser_name}")\n'
            f"pipe = {pipeline_class}.from_pretrained({base_args}, {trainer.adapter.denoiser_name}="
            f"{trainer.adapter.denoiser_name})"
        )
    rewards = ", ".join(
        f"`{name}` (weight {weight:g})" for name, weight in zip(trainer.reward_names, trainer.reward_weights.tolist())
    )
    config = {name: getattr(args, name) for name in CONFIG_FIELDS if hasattr(args, name)}
    if "data_prompt_dropout" in config:
        config["data_prompt_dropout"] = args.resolved_data_prompt_dropout  # as used, not None
    step = trainer.state.global_step
    lines = [
        CARD_MARKER,
        f"# {model_name or os.path.basename(os.path.abspath(args.output_dir))}",
        "",
        f"A {what} for {_link(base)} post-trained for {step} steps with **DDRL** "
        f"(Data-regularized Diffusion Reinforcement Learning, [arXiv 2512.04332]({PAPER})) using "
        f"ddrl-trl: a clipped, group-relative policy gradient on the rewards "
        f"below, anchored to reference data{f' ({_link(dataset_name)})' if dataset_name else ''} by the ordinary "
        f"diffusion loss ({_data_beta_text(trainer)}) so the reward is not hacked.",
        "",
        "## Use",
        "",
        f"```python\nfrom diffusers import {pipeline_class}"
        + (f", {type(trainer.adapter.denoiser).__name__}" if not trainer.is_lora else "")
        + f"\n\n{usage}\n```",
        "",
        *_guidance_note(trainer),
        "## Training",
        "",
        f"Rewards: {rewards}.",
        "",
        "```json\n" + json.dumps(config, indent=2, default=str) + "\n```",
    ]
    if has_samples:
        _, prompts, sample_step = trainer.last_samples
        lines += [
            "",
            f"## Samples (rollouts at step {sample_step})",
            "",
            f"![samples]({SAMPLES_FILE})",
            "",
            "Prompts: " + " | ".join(prompts),
        ]
    if trainer.last_validation is not None:
        _, prompts, validation_step, _ = trainer.last_validation
        per_prompt = args.validation_images_per_prompt
        lines += [
            "",
            f"## Validation samples (step {validation_step})",
            "",
            f"Fixed prompts and seeds, {per_prompt} samples per prompt (one row each), sampled as the rollouts are:",
            "",
            f"![validation samples]({VALIDATION_FILE})",
            "",
            "Prompts: " + " | ".join(prompts),
        ]
    curves = _curve_table(trainer.state.log_history)
    if curves:
        lines += ["", "## Reward and diffusion-loss curves", ""]
        if has_curves:
            lines += [f"![training curves]({CURVES_FILE})", ""]
        lines += curves
    lines += [
        "",
        "## Citation",
        "",
        "```bibtex\n@misc{ddrl,\n  title={Data-regularized Diffusion Reinforcement Learning},"
        "\n  eprint={2512.04332},\n  archivePrefix={arXiv}\n}\n```",
    ]
    return "\n".join(lines)


def _link(base: str) -> str:
    """A Hub link for a repo id; a local path or an in-memory pipeline is named as is."""
    looks_like_repo = base.count("/") == 1 and not os.path.exists(base) and not base.startswith((".", "~"))
    return f"[{base}](https://huggingface.co/{base})" if looks_like_repo else f"`{base}`"


def _save_samples(trainer, path: str) -> bool:
    if trainer.last_samples is None:
        return False
    trainer.last_samples[0].save(path)
    return True


def _data_beta_text(trainer) -> str:
    args = trainer.args
    if trainer.data_beta_control is None:
        return f"data_beta = {args.data_beta:g}"
    return (
        f"data_beta adapted from {args.data_beta:g} to {trainer.data_beta:.3g} to hold the data loss ratio at "
        f"{args.target_loss_ratio:g}"
    )


def _save_validation(trainer, output_dir: str) -> list[dict] | None:
    """The last validation grid (`validation.png`) and, per prompt, its first sample (`image_<i>.png`) for the Hub's
    gallery widget, in the form diffusers' training scripts write; returns the widget entries (None: no validation)."""
    if trainer.last_validation is None:
        return None
    grid, prompts, _, images = trainer.last_validation
    grid.save(os.path.join(output_dir, VALIDATION_FILE))
    firsts = _first_per_prompt(images, len(prompts))
    widget = []
    for index, (prompt, image) in enumerate(zip(prompts, firsts)):
        name = f"image_{index}.png"
        image.save(os.path.join(output_dir, name))
        widget.append({"text": prompt, "output": {"url": name}})
    return widget


def _first_per_prompt(images, num_prompts: int) -> list:
    """The first sample of each of `num_prompts` prompts (prompt-major rows), as PIL images (videos: middle frame)."""
    per_prompt = len(images) // num_prompts
    return to_pil(still_images(images[::per_prompt][:num_prompts]))


def _series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]


def _curve_table(log_history: list[dict], max_rows: int = 12) -> list[str]:
    """A markdown table of the curves at up to `max_rows` logged steps (readable without the image)."""
    series = {key: dict(_series(log_history, key)) for key, _ in CURVES}
    steps = sorted({step for values in series.values() for step in values})
    if not steps:
        return []
    if len(steps) > max_rows:
        stride = (len(steps) - 1) / (max_rows - 1)
        steps = sorted({steps[round(i * stride)] for i in range(max_rows)})
    keys = [key for key, _ in CURVES if series[key]]
    rows = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for step in steps:
        cells = [f"{series[k][step]:.4g}" if step in series[k] else "" for k in keys]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return rows


def _save_curves(log_history: list[dict], path: str) -> bool:
    """Plot the curves with matplotlib when it is installed (`ddrl-trl[demo]`); the table is there regardless."""
    present = [(key, label, _series(log_history, key)) for key, label in CURVES]
    present = [item for item in present if item[2]]
    if not present:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
    for ax, (key, label, points) in zip(axes[0], present):
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        if key.endswith("diffusion_loss_ratio"):
            ax.axhline(1.10, color="red", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
