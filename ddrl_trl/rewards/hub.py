"""Rewards named by a Hugging Face Hub repo id or a local folder, the way TRL's `GRPOTrainer` takes reward models.

`load_reward("yuvalkirstain/PickScore_v1")` (or a string in `DDRLTrainer(reward_funcs=...)`) looks at the folder's
files and `config.json` and builds one of:

- `CLIPReward`: a CLIP-family model (`model_type == "clip"`), scored as CLIPScore or PickScore;
- `AestheticReward`: the LAION aesthetic predictor (`aesthetic-model.safetensors` / `.pth`, the layout of
  `trl-lib/ddpo-aesthetic-predictor`) on a CLIP backbone;
- `ClassifierReward`: an `AutoModelForImageClassification` model, scored as the probability of a label.

Every one follows the reward contract of `ddrl_trl.rewards` and loads its weights safely: safetensors first, pickled
`.pth`/`.bin` files only through `torch.load(weights_only=True)`, and no remote code unless `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
import transformers
from packaging import version
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, AutoProcessor, CLIPModel

from .builtin import as_frames, to_pil

logger = logging.getLogger(__name__)

PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
"""Where PickScore's processor lives: `yuvalkirstain/PickScore_v1` ships the model only."""
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
"""The CLIP backbone the LAION aesthetic MLP was trained on (ViT-L/14 image embeddings)."""
AESTHETIC_FILES = ("aesthetic-model.safetensors", "aesthetic-model.pth")
"""Weight files of the aesthetic predictor, in order of preference (safetensors cannot run code when loaded)."""
SUPPORTED_KINDS = (
    "a CLIP-family model (config model_type 'clip': CLIPScore or PickScore), the LAION aesthetic predictor "
    "(aesthetic-model.safetensors or aesthetic-model.pth, e.g. trl-lib/ddpo-aesthetic-predictor), or an image "
    "classifier (config architectures '*ForImageClassification')"
)

# Files that tell what a repo holds; for a Hub id only these are fetched before the kind is known (the weights of
# transformers models are then fetched by `from_pretrained`, which takes safetensors first).
_METADATA_PATTERNS = ["*.json", "*.txt", "aesthetic-model.*"]
_CONFIG_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_COMMON_KWARGS = {"name"}
_KIND_KWARGS = {"clip": {"score", "processor"}, "aesthetic": {"clip_model"}, "classifier": {"label"}}


def load_reward(
    name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    **kwargs,
) -> HubReward:
    """A reward function from a local folder or a Hub repo id, its kind detected from the folder's files and config.

    Args:
        name_or_path: a local folder, or a Hub repo id (downloaded with `huggingface_hub`, cached).
        trust_remote_code: allow a config with `auto_map` (custom modelling code from the repo); refused otherwise.
        device: where the model runs. None: it follows the images, moving once to the device of the first batch
            (so each process of a multi-GPU run scores on its own GPU).
        torch_dtype: dtype of the transformers model (e.g. `torch.bfloat16`); None keeps the checkpoint's.
        **kwargs: `name=` (the metric name, default the last path component) and, per kind: `score=`
            (`"clipscore"` | `"pickscore"`) and `processor=` (another repo/folder for the processor) for CLIP;
            `clip_model=` (the backbone, default `openai/clip-vit-large-patch14`) for the aesthetic predictor;
            `label=` (a label name or id) for image classifiers.

    Returns:
        A callable `reward(images, prompts, **columns) -> list[float]` with a `__name__`.

    Raises:
        ValueError: the folder/repo is missing, needs remote code without `trust_remote_code=True`, holds none of the
            supported kinds, or a kind-specific argument is invalid. TypeError: an argument this kind does not take.
    """
    name_or_path = os.fspath(name_or_path)
    folder, is_local = _locate(name_or_path)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    configs = {f: _read_json(folder / f) for f in _CONFIG_FILES if f in files}
    _check_remote_code(name_or_path, configs, trust_remote_code)
    kind = _detect_kind(files, configs.get("config.json", {}))
    if kind is None:
        raise ValueError(_unknown_kind_message(name_or_path, files, configs.get("config.json", {})))
    unexpected = set(kwargs) - _COMMON_KWARGS - _KIND_KWARGS[kind]
    if unexpected:
        raise TypeError(
            f"load_reward({name_or_path!r}) got {', '.join(sorted(unexpected))}, which a {kind} reward does not take; "
            f"it takes {', '.join(sorted(_COMMON_KWARGS | _KIND_KWARGS[kind]))}."
        )
    found = _Found(
        name_or_path=name_or_path,
        folder=folder,
        # transformers loads from the folder when local, else from the repo id (its cache, weights fetched on demand).
        source=str(folder) if is_local else name_or_path,
        files=files,
        name=kwargs.pop("name", None) or _short_name(name_or_path),
        device=device,
        load_kwargs=_from_pretrained_kwargs(files, trust_remote_code, torch_dtype),
    )
    return _BUILDERS[kind](found, **kwargs)


# ---------------------------------------------------------------------------------------------- finding the files
def _looks_like_path(name: str) -> bool:
    """Whether a string is meant as a filesystem path rather than a Hub id (so a typo is not sent to the Hub)."""
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or os.path.exists(name)


def _locate(name_or_path: str) -> tuple[Path, bool]:
    """The local folder holding the repo's metadata files, and whether it is the user's own folder."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, True
    if _looks_like_path(name_or_path):
        what = "a file, not a folder: pass the folder that holds it" if path.is_file() else "no such folder"
        raise ValueError(f"Cannot load reward {name_or_path!r}: {what}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=_METADATA_PATTERNS)), False
    # Invalid ids raise ValueError, missing repos / offline mode OSError subclasses: one message for all of them.
    except (OSError, ValueError, EntryNotFoundError) as err:
        raise ValueError(
            f"Cannot load reward {name_or_path!r}: it is not a local folder, and the Hub could not provide it ({err})."
        ) from err


def _read_json(path: Path) -> dict:
    """A JSON config file as a dict (an unreadable one is reported with its path)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read {path}: {err}") from err
    return data if isinstance(data, dict) else {}


def _check_remote_code(name_or_path: str, configs: dict[str, dict], trust_remote_code: bool) -> None:
    """Refuse, before anything is loaded, a repo whose config asks for its own Python code (`auto_map`)."""
    needing = [f for f, config in configs.items() if "auto_map" in config]
    if needing and not trust_remote_code:
        raise ValueError(
            f"Reward {name_or_path!r} needs custom code from the repo ('auto_map' in {', '.join(needing)}), which "
            "runs arbitrary Python. Read it, then pass trust_remote_code=True to load_reward (or write a reward "
            "callable)."
        )


def _detect_kind(files: list[str], config: dict) -> str | None:
    """'aesthetic' | 'clip' | 'classifier' from the file names and config.json; None when it is none of these."""
    if any(f in files for f in AESTHETIC_FILES):
        return "aesthetic"
    if config.get("model_type") == "clip":
        return "clip"
    if any(str(a).endswith("ForImageClassification") for a in config.get("architectures") or []):
        return "classifier"
    return None


def _unknown_kind_message(name_or_path: str, files: list[str], config: dict) -> str:
    """What was found in an unsupported repo, what is supported, and the way out (a callable)."""
    shown = ", ".join(files[:8]) + (f", ... ({len(files)} files)" if len(files) > 8 else "") or "no files"
    found = f"files: {shown}"
    if config:
        found += f"; config.json model_type={config.get('model_type')!r}, architectures={config.get('architectures')}"
    return (
        f"Cannot tell what kind of reward model {name_or_path!r} is ({found}). Supported: {SUPPORTED_KINDS}. For any "
        f"other model, pass a callable f(images, prompts, **columns) -> list[float] (see docs/rewards.md)."
    )


def _short_name(name_or_path: str) -> str:
    """The metric name of a reward: the last path component (`rewards/PickScore_v1/mean`)."""
    return Path(name_or_path.rstrip("/\\")).name or name_or_path


def _from_pretrained_kwargs(files: list[str], trust_remote_code: bool, torch_dtype: torch.dtype | None) -> dict:
    """Safe `from_pretrained` arguments: safetensors required when the folder has them (transformers' own default
    takes them first too, and loads `.bin` with `weights_only=True`), remote code only when trusted."""
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        kwargs["use_safetensors"] = True
    if torch_dtype is not None:
        # transformers 4.56 renamed `torch_dtype` to `dtype`; the old name is deprecated in v5.
        new = version.parse(transformers.__version__) >= version.parse("4.56")
        kwargs["dtype" if new else "torch_dtype"] = torch_dtype
    return kwargs


def safe_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a pickled `.pth`/`.bin` file through `torch.load(weights_only=True)`,
    which refuses anything but tensors and plain containers (a pickle can run code when loaded)."""
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than tensors, and is refused: pickled weights are only loaded with "
            f"torch.load(weights_only=True). Save the state dict as safetensors instead. ({err})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(state).__name__}).")
    return state


# ------------------------------------------------------------------------------------------------ reward objects
def _projected(output) -> torch.Tensor:
    """Projected embeddings from `get_image_features` / `get_text_features`: a tensor before transformers v5, a
    `BaseModelOutputWithPooling` carrying them as `pooler_output` since."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HubReward:
    """Base of the model rewards: frozen modules, device placement, frames of videos, one batched forward.

    Subclasses implement `_score(frames, prompts, per_item, device) -> (N,) tensor`, one score per frame, where each
    prompt covers `per_item` consecutive frames (1 for images, F for videos).
    """

    def __init__(self, name: str, modules: list[nn.Module], device: str | torch.device | None):
        self.__name__ = name
        self._modules = modules
        for module in modules:
            module.eval().requires_grad_(False)
        self.device = torch.device(device) if device is not None else None
        if self.device is not None:
            self._place(self.device)

    def _place(self, device: torch.device) -> None:
        """Move the modules to `device` if they are elsewhere (a no-op after the first batch)."""
        for module in self._modules:
            if next(module.parameters()).device != device:
                module.to(device)

    def __call__(self, images: torch.Tensor, prompts: list[str], **columns) -> list[float]:
        """Scores of images `(B, 3, H, W)` in [0, 1] or videos `(B, F, 3, H, W)` (mean over frames), on any device."""
        frames, per_item = as_frames(images)
        device = self.device if self.device is not None else images.device
        self._place(device)
        with torch.no_grad():
            scores = self._score(to_pil(frames), list(prompts), per_item, device)
        return scores.float().view(-1, per_item).mean(dim=1).tolist()

    def _score(self, frames: list[Image.Image], prompts: list[str], per_item: int, device: torch.device):
        raise NotImplementedError  # each kind computes its own score

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__!r})"


class CLIPReward(HubReward):
    """Image-text similarity of a CLIP model: `score="clipscore"`: 2.5·max(cos, 0) (Hessel et al. 2021, in [0, 2.5]);
    `score="pickscore"`: logit_scale.exp()·cos / 26 (PickScore, normalised as in Flow-GRPO)."""

    def __init__(self, name, model: CLIPModel, processor, score: str, device):
        super().__init__(name, [model], device)
        self.model, self.score = model, score
        self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        # Prompts longer than the text tower's positions are truncated, not an error (CLIP: 77 tokens).
        self.max_length = min(self.tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    def _score(self, frames, prompts, per_item, device):
        pixels = self.image_processor(images=frames, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        image_emb = _projected(self.model.get_image_features(pixel_values=pixels.to(device, self.model.dtype)))
        text = {k: text[k].to(device) for k in ("input_ids", "attention_mask")}
        text_emb = _projected(self.model.get_text_features(**text))
        # One text embedding per prompt, repeated for each frame of its video.
        text_emb = F.normalize(text_emb.float(), dim=-1).repeat_interleave(per_item, dim=0)
        cos = (F.normalize(image_emb.float(), dim=-1) * text_emb).sum(dim=-1)
        if self.score == "pickscore":
            return self.model.logit_scale.exp().float() * cos / 26.0
        return 2.5 * cos.clamp(min=0)

    def __repr__(self) -> str:
        return f"CLIPReward({self.__name__!r}, score={self.score!r})"


class AestheticMLP(nn.Module):
    """The LAION aesthetic head of TRL's DDPO example: linear layers (no activations) with dropout between them,
    stored as `layers.{0,2,4,6,7}.{weight,bias}`; widths are read from the state dict."""

    LINEAR_INDICES = (0, 2, 4, 6, 7)
    DROPOUT: ClassVar[dict[int, float]] = {1: 0.2, 3: 0.2, 5: 0.1}

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        expected = {f"layers.{i}.{p}" for i in self.LINEAR_INDICES for p in ("weight", "bias")}
        if set(state_dict) != expected:
            raise ValueError(
                f"Not the aesthetic predictor's layout: expected keys {sorted(expected)}, got {sorted(state_dict)}."
            )
        shapes = {i: state_dict[f"layers.{i}.weight"].shape for i in self.LINEAR_INDICES}  # (out, in) each
        layers = (nn.Dropout(self.DROPOUT[i]) if i in self.DROPOUT else nn.Linear(*shapes[i][::-1]) for i in range(8))
        self.layers = nn.Sequential(*layers)
        self.load_state_dict(state_dict)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores `(N, 1)` of L2-normalised CLIP image embeddings `(N, D)`."""
        return self.layers(embeddings)


class AestheticReward(HubReward):
    """LAION aesthetic score (1–10 rating scale): the MLP on the L2-normalised CLIP image embedding, in float32."""

    def __init__(self, name, clip: CLIPModel, image_processor, mlp: AestheticMLP, device):
        super().__init__(name, [clip, mlp], device)
        self.clip, self.image_processor, self.mlp = clip, image_processor, mlp

    def _score(self, frames, prompts, per_item, device):
        pixels = self.image_processor(images=frames, return_tensors="pt")["pixel_values"]
        embeddings = _projected(self.clip.get_image_features(pixel_values=pixels.to(device, self.clip.dtype)))
        embeddings = F.normalize(embeddings.float(), dim=-1)
        return self.mlp(embeddings).squeeze(1)


class ClassifierReward(HubReward):
    """Softmax probability of one label of an image classifier: `label` fixed, or else the label named in each
    prompt (whole words, case-insensitive, the longest match; comma-separated synonyms such as ImageNet's
    "tabby, tabby cat" and underscores as spaces are understood)."""

    def __init__(self, name, model, image_processor, label: int | str | None, device):
        super().__init__(name, [model], device)
        self.model, self.image_processor = model, image_processor
        self.id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        self.label = _fixed_label(label, self.id2label) if label is not None else None
        self._matchers = _label_matchers(self.id2label)
        self._unlabeled: set[str] = set()

    def label_for(self, prompt: str) -> int | None:
        """The class id scored for `prompt`: the fixed label, or the one the prompt names (None if it names none)."""
        if self.label is not None:
            return self.label
        matches = [(len(text), -label, label) for label, text, pattern in self._matchers if pattern.search(prompt)]
        if not matches:
            if prompt not in self._unlabeled:  # warn once per prompt, not once per step
                self._unlabeled.add(prompt)
                examples = ", ".join(repr(v) for v in list(self.id2label.values())[:5])
                logger.warning(
                    "Reward %r: prompt %r names none of the classifier's %d labels (e.g. %s); its samples get no "
                    "score (counted in rewards/%s/invalid). Pass label= to load_reward to score one fixed label.",
                    self.__name__,
                    prompt,
                    len(self.id2label),
                    examples,
                    self.__name__,
                )
            return None
        return max(matches)[2]  # longest name; on a tie, the lowest id

    def _score(self, frames, prompts, per_item, device):
        labels = [self.label_for(p) for p in prompts]
        ids = torch.tensor([-1 if label is None else label for label in labels], device=device)
        ids = ids.repeat_interleave(per_item)
        pixels = self.image_processor(images=frames, return_tensors="pt")["pixel_values"]
        logits = self.model(pixel_values=pixels.to(device, self.model.dtype)).logits
        probs = logits.float().softmax(dim=-1).gather(1, ids.clamp(min=0)[:, None]).squeeze(1)
        return probs.masked_fill(ids < 0, float("nan"))  # NaN: an invalid score, excluded from the advantages


def _label_matchers(id2label: dict[int, str]) -> list[tuple[int, str, re.Pattern]]:
    """One whole-word, case-insensitive pattern per label name and per comma-separated synonym."""
    matchers = []
    for label, text in id2label.items():
        names = {text.strip(), *(part.strip() for part in text.split(","))}
        for name in {n.replace("_", " ") for n in names if n}:
            matchers.append((label, name, re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)))
    return matchers


def _fixed_label(label: int | str, id2label: dict[int, str]) -> int:
    """A `label=` argument (id or name, case-insensitive) as a class id."""
    if isinstance(label, int) and label in id2label:
        return label
    by_name = {v.lower(): k for k, v in id2label.items()}
    if isinstance(label, str) and label.lower() in by_name:
        return by_name[label.lower()]
    examples = ", ".join(f"{k}: {v!r}" for k, v in list(id2label.items())[:5])
    raise ValueError(f"label={label!r} is not one of the classifier's {len(id2label)} labels (e.g. {examples}).")


# ----------------------------------------------------------------------------------------------------- builders
@dataclass(frozen=True)
class _Found:
    """What `load_reward` found out about a reward before building it: every builder takes it, and its own options."""

    name_or_path: str  # as the caller gave it
    folder: Path  # the local folder holding the repo's metadata files
    source: str  # what `from_pretrained` loads from: the local folder, or the Hub repo id
    files: list[str]  # the file names in `folder`
    name: str  # the reward's metric name
    device: str | torch.device | None
    load_kwargs: dict  # `from_pretrained` keyword arguments (`_from_pretrained_kwargs`)


def _build_clip(found: _Found, score=None, processor=None) -> CLIPReward:
    """CLIP model + processor; PickScore scoring when asked, or by default when the name says PickScore."""
    score = score or ("pickscore" if "pickscore" in found.name_or_path.lower() else "clipscore")
    if score not in ("clipscore", "pickscore"):
        raise ValueError(f"score={score!r}: use 'clipscore' or 'pickscore'.")
    if processor is None:
        has_processor = any(f in found.files for f in _PROCESSOR_FILES)
        if not has_processor and score != "pickscore":
            raise ValueError(
                f"{found.name_or_path!r} has no processor files ({' or '.join(_PROCESSOR_FILES)}); pass processor= "
                f"naming the repo or folder of its CLIP processor."
            )
        processor = found.source if has_processor else PICKSCORE_PROCESSOR
    trust = found.load_kwargs["trust_remote_code"]
    clip_processor = AutoProcessor.from_pretrained(processor, trust_remote_code=trust)
    if not (hasattr(clip_processor, "image_processor") and hasattr(clip_processor, "tokenizer")):
        raise ValueError(f"processor {processor!r} lacks an image processor or a tokenizer; pass a CLIP processor.")
    model = CLIPModel.from_pretrained(found.source, **found.load_kwargs)
    return CLIPReward(found.name, model, clip_processor, score, found.device)


def _build_aesthetic(found: _Found, clip_model=AESTHETIC_CLIP) -> AestheticReward:
    """The aesthetic MLP from the preferred weight file, on the CLIP backbone `clip_model`."""
    weights = next(found.folder / f for f in AESTHETIC_FILES if f in found.files)
    mlp = AestheticMLP(safe_state_dict(weights))
    # Another repo: its own formats, so `use_safetensors` is not forced on it.
    clip_kwargs = {k: v for k, v in found.load_kwargs.items() if k != "use_safetensors"}
    clip = CLIPModel.from_pretrained(clip_model, **clip_kwargs)
    if mlp.layers[0].in_features != (width := clip.config.projection_dim):
        raise ValueError(
            f"The aesthetic MLP in {weights} takes {mlp.layers[0].in_features}-d embeddings, but clip_model="
            f"{clip_model!r} gives {width}-d ones; pass the CLIP it was trained on (default {AESTHETIC_CLIP!r})."
        )
    image_processor = AutoImageProcessor.from_pretrained(
        clip_model, trust_remote_code=found.load_kwargs["trust_remote_code"]
    )
    return AestheticReward(found.name, clip, image_processor, mlp, found.device)


def _build_classifier(found: _Found, label=None) -> ClassifierReward:
    """An `AutoModelForImageClassification` model with its image processor, scoring `label` or the prompt's label."""
    model = AutoModelForImageClassification.from_pretrained(found.source, **found.load_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(
        found.source, trust_remote_code=found.load_kwargs["trust_remote_code"]
    )
    return ClassifierReward(found.name, model, image_processor, label, found.device)


#: The builder of each kind `_detect_kind` names; each takes the kind's `_KIND_KWARGS`.
_BUILDERS = {"clip": _build_clip, "aesthetic": _build_aesthetic, "classifier": _build_classifier}


__all__ = ["AestheticMLP", "AestheticReward", "CLIPReward", "ClassifierReward", "HubReward", "load_reward"]
