"""`trainer.push_to_hub()`: what would be uploaded (the Hub API is replaced by a recorder; the Hub cannot be
reached)."""

import torch
import yaml
from helpers import assert_reloads_to_trained_outputs, lora, make_trainer
from PIL import Image

from ddrl_trl.testing import tiny_sd_pipeline


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_push_uploads_diffusers_lora_and_a_complete_model_card(tmp_path, reference_dataset, hub):
    tiny_sd_pipeline().save_pretrained(tmp_path / "base")
    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(),
        pipeline=str(tmp_path / "base"),
        eval_dataset=reference_dataset,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        log_sample_images_steps=1,
        num_sample_images=4,
        save_strategy="steps",
        save_steps=1,
        cfg_scale=2.0,
        negative_prompt="blurry",
    )
    trainer.train()
    trainer.push_to_hub(model_name="digits-ddrl-lora", dataset_name="someone/paired-digits", tags=["my-tag"])
    assert hub.calls == [("create_repo", "out"), ("upload_folder", "someone/out")]
    uploaded = hub.capture_dir
    names = {p.name for p in uploaded.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "README.md", "samples.png", "training_curves.png"} <= names
    assert not any(n.startswith("checkpoint-") for n in names)  # checkpoints are not pushed
    # the pushed LoRA (alpha 16, r 4) reloads at its trained strength in plain diffusers
    plain = tiny_sd_pipeline()
    plain.load_lora_weights(str(uploaded))
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.adapter.encode_prompts(["a red cat", "a blue dog"])
    assert_reloads_to_trained_outputs(trainer, plain, (x, torch.tensor([900, 400]), cond))
    readme = (uploaded / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "diffusers"
    assert meta["base_model"] == str(tmp_path / "base")
    assert {"ddrl", "trl", "diffusers-training", "lora", "text-to-image", "my-tag"} <= set(meta["tags"])
    assert meta["datasets"] == ["someone/paired-digits"]  # create_model_card's arguments reach the card
    assert (
        "\n# digits-ddrl-lora\n" in readme
        and "[someone/paired-digits](https://huggingface.co/someone/paired-digits)" in readme
    )
    assert "arxiv.org/abs/2512.04332" in readme
    assert '"data_beta": 1.5' in readme and '"num_generations": 2' in readme  # as used: the guided default at w = 2
    assert '"cfg_scale": 2.0' in readme and '"data_prompt_dropout": 0.2' in readme  # the dropout as used
    note = "classifier-free guidance 2 and the negative prompt 'blurry': sample it with `guidance_scale=2, "
    assert note + "negative_prompt='blurry'`" in readme
    assert "brightness_reward" in readme and "![samples](samples.png)" in readme
    assert "![training curves](training_curves.png)" in readme
    assert "| step | reward | loss/data | eval_diffusion_loss_ratio |" in readme and "\n| 3 | " in readme
    assert "pipe.load_lora_weights" in readme
    # 4 samples of 32 px, a row per prompt (groups of 2), upscaled to 128 px with 4 px gaps and a caption strip each
    assert Image.open(uploaded / "samples.png").size == (2 * 128 + 3 * 4, 2 * (18 + 128 + 4) + 4)
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(uploaded))  # what was uploaded loads in plain diffusers


def test_a_readme_the_user_wrote_is_never_overwritten(tmp_path, reference_dataset, hub):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=1)
    trainer.train()
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "README.md").write_text("# my own card\n")
    trainer.push_to_hub()
    assert (hub.capture_dir / "README.md").read_text() == "# my own card\n"


def test_training_writes_a_complete_model_card_into_output_dir(tmp_path, reference_dataset, monkeypatch):
    """As TRL: README.md in output_dir at every checkpoint and at save_model(), with the real path to load from, no
    template TODO, the evaluation rewards and the monitor's verdict in its table; curves drawn without offsets."""
    from ddrl_trl import HackingMonitorCallback
    from ddrl_trl.monitoring.model_card import curves

    def judge(images, prompts, **kwargs):
        return (1 - images.flatten(1).mean(1)).tolist()

    monitor = HackingMonitorCallback(eval_steps=1, watch=("loss_ratio", "eval_rewards"))
    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(),
        eval_dataset=reference_dataset,
        eval_reward_funcs=[judge],
        validation_prompts=["a red cat"],
        validation_images_per_prompt=2,
        callbacks=[monitor],
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    out = tmp_path / "out"
    at_checkpoint = (out / "README.md").read_text()  # written with checkpoint-2, before any save_model
    assert "| 2 |" in at_checkpoint
    trainer.save_model()
    readme = (out / "README.md").read_text()
    assert f'pipe.load_lora_weights("{out.resolve()}")' in readme and "<this repo>" not in readme
    assert "TODO" not in readme and "How to use" not in readme and readme.count("## Use") == 1
    header = next(line for line in readme.splitlines() if line.startswith("| step |"))
    assert "eval_rewards/judge" in header and "eval_rewards/brightness_reward" in header
    assert header.endswith("| hacking/detected |") and "\n| 2 | " in readme
    verdict = "Hacking monitor (watching loss_ratio, eval_rewards): no signal tripped; last checked at step 2"
    assert verdict + " (its weights: `last-good/`)." in readme
    assert ("data_beta", "data_beta (fixed at 0.3)") in curves(trainer)
    assert ("eval_rewards/judge", "judge on validation samples (not trained on: should hold)") in curves(trainer)
    assert {"training_curves.png", "validation.png", "image_0.png"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.tmp"))


def test_curves_are_drawn_with_plain_tick_labels(tmp_path, monkeypatch):
    """A near-constant curve (a reward moving in its 7th digit, a fixed data_beta) is labelled with its values, not
    with matplotlib's offset notation ("1e-7 + 2.500001e-1")."""
    import matplotlib.pyplot as plt

    from ddrl_trl.monitoring.model_card import _plot_curves

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    history = [{"step": step, "reward": 0.25 + 1e-7 * step, "data_beta": 0.3} for step in range(1, 6)]
    assert _plot_curves([("reward", "reward"), ("data_beta", "data_beta (fixed at 0.3)")], history, tmp_path / "c.png")
    figures[-1].canvas.draw()
    assert [ax.yaxis.get_major_formatter().get_offset() for ax in figures[-1].axes] == ["", ""]
    assert [ax.get_title() for ax in figures[-1].axes] == ["reward", "data_beta (fixed at 0.3)"]
    assert (tmp_path / "c.png").stat().st_size > 1000 and not list(tmp_path.glob("*.tmp"))
