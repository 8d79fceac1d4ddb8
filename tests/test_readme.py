"""The README's Python snippet runs as printed on this machine (no GPU): only the Hub ids it names are swapped for
local stand-ins, and its 100 steps for 1."""

import re
import warnings
from pathlib import Path

import datasets
import torch
from diffusers import StableDiffusionPipeline

from ddrl_trl.testing import tiny_sd_pipeline

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_snippet_runs_as_printed(tmp_path, monkeypatch, reference_dataset):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    base = tmp_path / "base"
    tiny_sd_pipeline().save_pretrained(base)
    assert snippet.count('"stable-diffusion-v1-5/stable-diffusion-v1-5"') == 2 and "max_steps=100," in snippet
    snippet = snippet.replace('"stable-diffusion-v1-5/stable-diffusion-v1-5"', repr(str(base)))
    snippet = snippet.replace("max_steps=100,", "max_steps=1,")
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split: reference_dataset if name.startswith("your/") else None
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 — the README's own code
    noisy = [str(w.message) for w in caught if "torch_dtype" in str(w.message) or "pin_memory" in str(w.message)]
    assert not noisy  # a quiet run: the pipeline loads with dtype=, nothing pins memory without an accelerator
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # what the snippet asks for: False on CPU
    assert namespace["trainer"].state.global_step == 1 and namespace["trainer"].args.bf16 == bf16
    assert isinstance(namespace["pipe"], StableDiffusionPipeline)
    assert (tmp_path / "sd15-ddrl" / "pytorch_lora_weights.safetensors").is_file()
    assert "pipe.load_lora_weights" in (tmp_path / "sd15-ddrl" / "README.md").read_text()
