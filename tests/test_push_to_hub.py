"""`trainer.push_to_hub()`: what would be uploaded (the Hub API is replaced by a recorder; the Hub cannot be
reached)."""

import shutil

import pytest
import torch
import transformers.trainer
import yaml
from PIL import Image
from test_trainer import assert_reloads_to_trained_outputs, lora, make_trainer

from ddrl_trl.testing import tiny_sd_pipeline


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls and copies the folder that would be uploaded."""

    def __init__(self, capture_dir):
        self.capture_dir, self.calls = capture_dir, []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id))
        return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        self.calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, self.capture_dir, ignore=shutil.ignore_patterns(*ignore_patterns))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    api = RecordingHubApi(tmp_path / "uploaded")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    return api


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
    assert Image.open(uploaded / "samples.png").size == (2 * 32, 2 * 32)  # 4 samples of 32 px
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(uploaded))  # what was uploaded loads in plain diffusers


def test_a_readme_the_user_wrote_is_never_overwritten(tmp_path, reference_dataset, hub):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=1)
    trainer.train()
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "README.md").write_text("# my own card\n")
    trainer.push_to_hub()
    assert (hub.capture_dir / "README.md").read_text() == "# my own card\n"
