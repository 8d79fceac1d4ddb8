"""The model card `DDRLTrainer.push_to_hub()` uploads: diffusers metadata, how to load the weights, the rewards, the
training configuration, sample images, and the reward and diffusion-loss curves.

`DDRLTrainer` writes it into `output_dir` at every checkpoint and at `save_model()` (as TRL's trainers do), and
`push_to_hub()` uploads it. The card is a `huggingface_hub.ModelCard` with diffusers' metadata and tags
(`populate_model_card`: `library_name: diffusers`, as cards from diffusers' own training scripts), on a template of
ours (diffusers' carries TODO placeholders this card fills). A README.md the user wrote in `output_dir` is never
overwritten: only cards carrying `CARD_MARKER` are regenerated; each file is written whole or not at all.
"""

from __future__ import annotations

import json
import os

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData

from ..checkpoints.weight_files import atomic_write
from ..rewards import to_pil
from .tracking import still_images

CARD_MARKER = "<!-- written by ddrl-trl: regenerated at each save and push -->"
#: Older cards of ours, still regenerated.
_OLD_MARKERS = ("<!-- written by ddrl-trl: regenerated on each push -->",)
#: The card's template: the metadata, then the description this module writes.
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ model_description }}\n"
PAPER = "https://arxiv.org/abs/2512.04332"
SAMPLES_FILE = "samples.png"
CURVES_FILE = "training_curves.png"
VALIDATION_FILE = "validation.png"
#: Curves drawn in the card: (log key, label). Eval keys appear only when `evaluate()` ran; `curves` adds each
#: reward's validation score and names the data_beta panel for the run.
CURVES = (
    ("reward", "reward (trained on)"),
    ("loss/data", "data term: diffusion loss on reference data"),
    ("eval_diffusion_loss_ratio", "held-out diffusion loss / base (> 1.10: hacking)"),
    ("eval_guided_diffusion_loss_ratio", "held-out guided-output loss / base's (> 1.10: hacking)"),
    ("eval_diversity_ratio", "validation samples' diversity / base's"),
)
#: The hacking monitor's verdict per evaluation (1: a watched signal tripped), a column of the table.
HACKING_KEY = "hacking/detected"
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
            text = file.read()
        if not any(marker in text for marker in (CARD_MARKER, *_OLD_MARKERS)):
            return None  # the user's own card
    os.makedirs(output_dir, exist_ok=True)
    has_samples = _save_samples(trainer, os.path.join(output_dir, SAMPLES_FILE))
    has_curves = _plot_curves(curves(trainer), trainer.state.log_history, os.path.join(output_dir, CURVES_FILE))
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
        template_str=CARD_TEMPLATE,
        model_description=_description(trainer, has_samples, has_curves, model_name, dataset_name),
    )
    kind = "text-to-video" if trainer.adapter.num_frames else "text-to-image"
    family_tags = [*trainer._tag_names, kind, "lora" if trainer.is_lora else "full-fine-tune"]
    card = populate_model_card(card, tags=family_tags + [t for t in (tags or []) if t not in family_tags])
    atomic_write(path, lambda staging: card.save(staging))
    return path


def _save_png(image, path: str) -> None:
    atomic_write(path, lambda staging: image.save(staging, format="PNG"))


def weights_location(trainer) -> str:
    """Where a reader loads the weights from: the Hub repo being pushed to, else the output folder's absolute path."""
    repo = getattr(trainer, "hub_model_id", None) or (trainer.args.hub_model_id if trainer.args.push_to_hub else None)
    return repo or os.path.abspath(trainer.args.output_dir)


def _description(
    trainer, has_samples: bool, has_curves: bool, model_name: str | None, dataset_name: str | None
) -> str:
    """The card's text: title and summary, how to load the weights, intended uses and the monitor's verdict, the
    training setup, samples, validation samples, curves, citation."""
    args, base = trainer.args, trainer.base_model_id or "<base model>"
    what = "LoRA adapter" if trainer.is_lora else f"fine-tuned `{trainer.adapter.denoiser_name}`"
    step = trainer.restored_step if trainer.restored_step is not None else trainer.state.global_step
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
        _usage(trainer, base),
        "",
        *_guidance_note(trainer),
        "## Intended uses & limitations",
        "",
        "Post-trained to raise the rewards below. The data term holds the model to its reference data, but a reward "
        "can still be gamed in ways the held-out diffusion loss does not show: look at the samples and the "
        "evaluation rewards below before relying on it.",
        "",
        *_monitor_verdict(trainer),
        *_training_setup(trainer),
        *(_samples_section(trainer) if has_samples else []),
        *_validation_section(trainer),
        *_curves_section(trainer, has_curves),
        "",
        "## Citation",
        "",
        "```bibtex\n@misc{ddrl,\n  title={Data-regularized Diffusion Reinforcement Learning},"
        "\n  eprint={2512.04332},\n  archivePrefix={arXiv}\n}\n```",
    ]
    return "\n".join(lines)


def _usage(trainer, base: str) -> str:
    """A Python block that loads the weights with plain diffusers, from where they are (`weights_location`)."""
    args, pipeline_class = trainer.args, type(trainer.pipeline).__name__
    revision = (args.model_init_kwargs or {}).get("revision")
    base_args = f'"{base}"' + (f', revision="{revision}"' if revision not in (None, "main") else "")
    weights, name = weights_location(trainer), trainer.adapter.denoiser_name
    if trainer.is_lora:
        imports = pipeline_class
        usage = f'pipe = {pipeline_class}.from_pretrained({base_args})\npipe.load_lora_weights("{weights}")'
    else:
        denoiser_class = type(trainer.adapter.denoiser).__name__
        imports = f"{pipeline_class}, {denoiser_class}"
        usage = (
            f'{name} = {denoiser_class}.from_pretrained("{weights}", subfolder="{name}")\n'
            f"pipe = {pipeline_class}.from_pretrained({base_args}, {name}={name})"
        )
    return f"```python\nfrom diffusers import {imports}\n\n{usage}\n```"


def _training_setup(trainer) -> list[str]:
    """The rewards with their weights, and the configuration (the data-term prompt dropout as used)."""
    args = trainer.args
    rewards = ", ".join(
        f"`{name}` (weight {weight:g})" for name, weight in zip(trainer.reward_names, trainer.reward_weights.tolist())
    )
    config = {name: getattr(args, name) for name in CONFIG_FIELDS if hasattr(args, name)}
    if "data_prompt_dropout" in config:
        config["data_prompt_dropout"] = args.resolved_data_prompt_dropout  # as used, not None
    return [
        "## Training",
        "",
        f"Rewards: {rewards}.",
        "",
        "```json\n" + json.dumps(config, indent=2, default=str) + "\n```",
    ]


def _samples_section(trainer) -> list[str]:
    samples = trainer.reporter.last_samples
    return [
        "",
        f"## Samples (rollouts at step {samples.step})",
        "",
        f"![samples]({SAMPLES_FILE})",
        "",
        "Prompts: " + " | ".join(samples.prompts),
    ]


def _validation_section(trainer) -> list[str]:
    validation = trainer.reporter.last_validation
    if validation is None:
        return []
    per_prompt = trainer.args.validation_images_per_prompt
    return [
        "",
        f"## Validation samples (step {validation.step})",
        "",
        f"Fixed prompts and seeds, {per_prompt} samples per prompt (one row each), sampled as the rollouts are:",
        "",
        f"![validation samples]({VALIDATION_FILE})",
        "",
        "Prompts: " + " | ".join(validation.prompts),
    ]


def _curves_section(trainer, has_curves: bool) -> list[str]:
    table = _curve_table(curves(trainer), trainer.state.log_history)
    if not table:
        return []
    figure = [f"![training curves]({CURVES_FILE})", ""] if has_curves else []
    return ["", "## Reward and diffusion-loss curves", "", *figure, *table]


def _link(base: str) -> str:
    """A Hub link for a repo id; a local path or an in-memory pipeline is named as is."""
    looks_like_repo = base.count("/") == 1 and not os.path.exists(base) and not base.startswith((".", "~"))
    return f"[{base}](https://huggingface.co/{base})" if looks_like_repo else f"`{base}`"


def _save_samples(trainer, path: str) -> bool:
    if trainer.reporter.last_samples is None:
        return False
    _save_png(trainer.reporter.last_samples.image, path)
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
    validation = trainer.reporter.last_validation
    if validation is None:
        return None
    prompts, images = validation.prompts, validation.images
    _save_png(validation.grid, os.path.join(output_dir, VALIDATION_FILE))
    firsts = _first_per_prompt(images, len(prompts))
    widget = []
    for index, (prompt, image) in enumerate(zip(prompts, firsts)):
        name = f"image_{index}.png"
        _save_png(image, os.path.join(output_dir, name))
        widget.append({"text": prompt, "output": {"url": name}})
    return widget


def _first_per_prompt(images, num_prompts: int) -> list:
    """The first sample of each of `num_prompts` prompts (prompt-major rows), as PIL images (videos: middle frame)."""
    per_prompt = len(images) // num_prompts
    return to_pil(still_images(images[::per_prompt][:num_prompts]))


def _series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]


def curves(trainer) -> list[tuple[str, str]]:
    """The card's curves for this run: `CURVES`, each reward's score on the validation samples, and data_beta titled
    for what the run did (fixed, or adapted towards `target_loss_ratio`)."""
    found = list(CURVES)
    for name in trainer.reward_names:
        found.append((f"eval_rewards/{name}", f"{name} on validation samples (trained on)"))
    for name in trainer.eval_reward_names:
        found.append((f"eval_rewards/{name}", f"{name} on validation samples (not trained on: should hold)"))
    args = trainer.args
    if trainer.data_beta_control is not None:
        found.append(("data_beta", f"data_beta, adapted to hold the data loss ratio at {args.target_loss_ratio:g}"))
    else:
        found.append(("data_beta", f"data_beta (fixed at {args.data_beta:g})"))
    return found


def _monitor_verdict(trainer) -> list[str]:
    """What the hacking monitor (if the run had one) concluded, with where the last good weights are."""
    from .hacking_monitor import HackingMonitorCallback

    monitors = [c for c in trainer.callback_handler.callbacks if isinstance(c, HackingMonitorCallback)]
    if not monitors:
        return []
    monitor, watched = monitors[0], ", ".join(monitors[0].watch)
    good = monitor.last_good_step
    kept = f" (its weights: `{monitor.last_good_dir}/`)" if good is not None and monitor.last_good_dir else ""
    if monitor.hacking_step is not None:
        text = (
            f"**Hacking monitor: reward hacking suspected at step {monitor.hacking_step}** (watching {watched}); the "
            f"last step where no signal tripped was {good if good is not None else 'none'}{kept}."
        )
    elif good is not None:
        text = f"Hacking monitor (watching {watched}): no signal tripped; last checked at step {good}{kept}."
    else:
        text = f"Hacking monitor (watching {watched}): no evaluation measured every watched signal yet."
    if trainer.restored_step is not None:
        text += (
            f" The weights here are those last good ones, of step {trainer.restored_step}; training ran to step "
            f"{trainer.state.global_step}."
        )
    unmeasured = getattr(monitor, "unmeasured_steps", [])
    if unmeasured:
        steps = ", ".join(map(str, unmeasured[:8])) + (", …" if len(unmeasured) > 8 else "")
        text += f" A watched signal could not be measured at step(s) {steps} (see the run's warnings)."
    return [text, ""]


def _curve_table(curves: list[tuple[str, str]], log_history: list[dict], max_rows: int = 12) -> list[str]:
    """A markdown table of the curves (and the monitor's verdicts) at up to `max_rows` logged steps, readable
    without the image; a step's last logged value is shown."""
    keys = [key for key, _ in curves] + [HACKING_KEY]
    series = {key: dict(_series(log_history, key)) for key in keys}
    steps = sorted({step for values in series.values() for step in values})
    if not steps:
        return []
    if len(steps) > max_rows:
        stride = (len(steps) - 1) / (max_rows - 1)
        steps = sorted({steps[round(i * stride)] for i in range(max_rows)})
    keys = [key for key in keys if series[key]]
    rows = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for step in steps:
        cells = [f"{series[k][step]:.4g}" if step in series[k] else "" for k in keys]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return rows


def _plot_curves(curves_of_run: list[tuple[str, str]], log_history: list[dict], path: str) -> bool:
    """Plot the logged curves with matplotlib when it is installed (`ddrl-trl[demo]`), written whole or not at all;
    the card's table is there regardless. Plain tick labels (no offset notation)."""
    present = [(key, label, _series(log_history, key)) for key, label in curves_of_run]
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
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        if key.endswith("diffusion_loss_ratio"):
            ax.axhline(1.10, color="red", linestyle="--", linewidth=1)
    fig.tight_layout()
    atomic_write(path, lambda staging: fig.savefig(staging, dpi=110, format="png"))
    plt.close(fig)
    return True
