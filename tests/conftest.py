import contextlib
import os

# Before anything imports huggingface_hub, which reads these once: the Hub is never reached from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil

import numpy as np
import pytest
import torch
import transformers.trainer
from datasets import Dataset
from PIL import Image

# OMP_NUM_THREADS wins, so parallel pytest runs on a small machine can share it without oversubscribing.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

PROMPTS = ["a red cat", "a blue dog", "a green bird"]


def make_reference_dataset() -> Dataset:
    """Prompts with paired reference images of another size than the training resolution (to exercise resizing)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(6)]
    return Dataset.from_dict({"prompt": PROMPTS * 2, "image": images, "label": [0, 1, 2] * 2})


@pytest.fixture
def reference_dataset():
    return make_reference_dataset()


def brightness_reward(images, prompts, **kwargs):
    return images.float().flatten(1).mean(dim=1).tolist()


@pytest.fixture
def reference_videos():
    """Prompts with paired 9-frame reference videos (lists of 20x24 frames, cropped to 16x16 in training)."""
    rng = np.random.default_rng(1)
    videos = [[Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(9)] for _ in range(6)]
    return Dataset.from_dict({"prompt": PROMPTS * 2, "video": videos})


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
    """The Hub API replaced by a `RecordingHubApi` (the Hub cannot be reached from tests)."""
    api = RecordingHubApi(tmp_path / "uploaded")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    return api


@pytest.fixture
def observe():
    """`observe(event, callback)`: a step hook (`ddrl_trl.step.hooks`) for the rest of the test."""
    from ddrl_trl.step.hooks import observing

    with contextlib.ExitStack() as stack:
        yield lambda event, callback: stack.enter_context(observing(event, callback))


@pytest.fixture
def no_rollouts(observe):
    """Fails the test if a rollout starts: for checks that must refuse bad input before any expensive work. Its
    value's `remove()` lifts it for the rest of the test."""

    def forbidden(rows):
        raise AssertionError("a rollout started before the input was checked")

    return observe("rollout_start", forbidden)  # `.remove()` lets a test go on to train
