"""Rewards named by a local folder or Hub id (`load_reward`, `resolve_reward`) and the JPEG built-ins.

Every model is a tiny one built from a config and saved to a temporary folder; every expected score is recomputed here
from the saved model and processor by hand (the formula written out), never by calling the code under test.
"""

import io
import math
import os
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from ddrl_trl import load_reward
from ddrl_trl.rewards import compute_rewards, resolve_reward
from ddrl_trl.testing import build_word_tokenizer
from ddrl_trl.testing.components import tiny_clip_text_config

PROMPTS = ["a red cat", "a blue dog", "a photo of a bird", "the green house"]
LABELS = {0: "cat", 1: "dog", 2: "hot dog", 3: "tabby, tabby cat"}
MLP_WIDTHS = [(1024, 8), (128, 1024), (64, 128), (16, 64), (1, 16)]  # (out, in) of layers.0, 2, 4, 6, 7


def _images(seed, shape=(4, 3, 20, 24)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _pil(images):
    """[0, 1] floats → PIL, written out independently of `to_pil`."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def _cos(model, processor, images, prompts):
    """Cosine of each image with its prompt, straight from the CLIP towers."""
    pixels = processor.image_processor(images=_pil(images), return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.T
        txt_out = model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        txt = txt_out @ model.text_projection.weight.T
    return (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)


def _mlp_state(seed):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, (out, inp) in zip((0, 2, 4, 6, 7), MLP_WIDTHS):
        state[f"layers.{index}.weight"] = torch.randn(out, inp, generator=gen) / math.sqrt(inp)
        state[f"layers.{index}.bias"] = torch.randn(out, generator=gen) * 0.1
    return state


def _aesthetic_by_hand(clip, processor, images, state):
    pixels = processor.image_processor(images=_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        x = clip.vision_model(pixel_values=pixels).pooler_output @ clip.visual_projection.weight.T
    x = x / x.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):  # dropout is the identity at inference, and there are no activations
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x[:, 0]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hub traffic: huggingface_hub read HF_HUB_OFFLINE when `datasets` imported it, before conftest set it, so
    without this a Hub id would wait on network timeouts instead of being answered from the cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CLIP (with its processor) and a tiny ViT classifier, saved to folders, plus the in-memory originals."""
    root = tmp_path_factory.mktemp("rewards")
    tokenizer = build_word_tokenizer(" ".join(PROMPTS).split(), model_max_length=16)
    text = tiny_clip_text_config(len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    clip_vision = {**vision, "image_size": 16, "patch_size": 8}
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=clip_vision, projection_dim=8)).eval()
    clip.logit_scale.data.fill_(math.log(40.0))  # not the init value: the score must read the checkpoint's
    crop = {"height": 16, "width": 16}
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=crop), tokenizer)
    clip.save_pretrained(root / "tiny-clip")
    processor.save_pretrained(root / "tiny-clip")

    label2id = {v: k for k, v in LABELS.items()}
    vit_config = ViTConfig(image_size=16, patch_size=8, id2label=LABELS, label2id=label2id, **vision)
    vit = ViTForImageClassification(vit_config).eval()
    vit_processor = ViTImageProcessor(size=crop)
    vit.save_pretrained(root / "tiny-vit")
    vit_processor.save_pretrained(root / "tiny-vit")
    return {"root": root, "clip": clip, "processor": processor, "vit": vit, "vit_processor": vit_processor}


def _aesthetic_dir(root, name, files):
    folder = root / name
    folder.mkdir()
    for filename, state in files.items():
        save = save_file if filename.endswith(".safetensors") else torch.save
        save(state, str(folder / filename))
    return folder


def test_clipscore_and_pickscore_match_the_formulas(tiny):
    images, clip_dir = _images(0), tiny["root"] / "tiny-clip"
    cos = _cos(tiny["clip"], tiny["processor"], images, PROMPTS)
    assert (cos < 0).any() and (cos > 0).any()  # so the max(cos, 0) of CLIPScore is exercised

    reward = load_reward(clip_dir)
    assert reward.__name__ == "tiny-clip" and reward.score == "clipscore"
    torch.testing.assert_close(torch.tensor(reward(images, PROMPTS)), 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-4)
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())

    pick = load_reward(clip_dir, score="pickscore")
    torch.testing.assert_close(torch.tensor(pick(images, PROMPTS)), 40.0 * cos / 26, atol=1e-5, rtol=1e-4)

    # A folder named like PickScore defaults to PickScore; its processor comes from elsewhere (processor=).
    pick_dir = tiny["root"] / "tiny-PickScore_v1"
    tiny["clip"].save_pretrained(pick_dir)  # weights and config only, as in yuvalkirstain/PickScore_v1
    named = load_reward(pick_dir, processor=str(clip_dir))
    assert named.score == "pickscore" and named.__name__ == "tiny-PickScore_v1"
    torch.testing.assert_close(torch.tensor(named(images, PROMPTS)), 40.0 * cos / 26, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="score='clip'.*'clipscore' or 'pickscore'"):
        load_reward(clip_dir, score="clip")
    with pytest.raises(ValueError, match="no processor files.*processor="):
        load_reward(pick_dir, score="clipscore")
    with pytest.raises(TypeError, match="label.*clip reward does not take.*processor, score"):
        load_reward(clip_dir, label="cat")


def test_aesthetic_predictor_matches_the_mlp_by_hand_and_prefers_safetensors(tiny):
    images, clip_dir = _images(1), str(tiny["root"] / "tiny-clip")
    pth_state, safe_state = _mlp_state(1), _mlp_state(2)
    only_pth = _aesthetic_dir(tiny["root"], "aesthetic-pth", {"aesthetic-model.pth": pth_state})
    both = _aesthetic_dir(
        tiny["root"], "aesthetic-both", {"aesthetic-model.pth": pth_state, "aesthetic-model.safetensors": safe_state}
    )
    from_pth = _aesthetic_by_hand(tiny["clip"], tiny["processor"], images, pth_state)
    from_safe = _aesthetic_by_hand(tiny["clip"], tiny["processor"], images, safe_state)
    assert (from_pth - from_safe).abs().min() > 1e-3  # the two files give different scores

    reward = load_reward(only_pth, clip_model=clip_dir)
    torch.testing.assert_close(torch.tensor(reward(images, PROMPTS)), from_pth, atol=1e-5, rtol=1e-4)
    preferred = load_reward(both, clip_model=clip_dir)
    torch.testing.assert_close(torch.tensor(preferred(images, PROMPTS)), from_safe, atol=1e-5, rtol=1e-4)
    assert not preferred.mlp.training

    wrong = _aesthetic_dir(tiny["root"], "aesthetic-wrong", {"aesthetic-model.pth": {"weight": torch.ones(2)}})
    with pytest.raises(ValueError, match="layout.*layers.0.weight"):
        load_reward(wrong, clip_model=clip_dir)


class _Exploit:
    """Unpickling this runs `os.makedirs(marker)`: what a malicious .pth file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_pickled_weights_load_only_as_plain_tensors(tiny, tmp_path):
    marker = tmp_path / "code-ran"
    folder = _aesthetic_dir(tmp_path, "evil", {"aesthetic-model.pth": {**_mlp_state(1), "x": _Exploit(marker)}})
    with pytest.raises(ValueError, match=r"refused.*weights_only=True"):
        load_reward(folder, clip_model=str(tiny["root"] / "tiny-clip"))
    assert not marker.exists()


def test_remote_code_refused_before_loading_and_unknown_folders_explained(tiny, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()  # a config asking for custom code, and no weights: any attempt to load would fail differently
    (remote / "config.json").write_text('{"model_type": "clip", "auto_map": {"AutoModel": "modeling_x.Scorer"}}')
    with pytest.raises(ValueError, match=r"custom code.*config.json.*trust_remote_code=True"):
        load_reward(remote)
    with pytest.raises(ValueError, match="custom code"):
        resolve_reward(str(remote))

    unknown = tmp_path / "text-model"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "bert", "architectures": ["BertForMaskedLM"]}')
    (unknown / "notes.txt").write_text("hi")
    pattern = r"Cannot tell.*config.json, notes.txt.*'bert'.*BertForMaskedLM.*CLIP.*aesthetic.*ForImageClassification"
    with pytest.raises(ValueError, match=pattern + r".*callable"):
        load_reward(unknown)
    with pytest.raises(ValueError, match="no such folder"):
        load_reward(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a local folder, and the Hub could not provide it"):
        load_reward("nobody/no-such-reward-repo")  # HF_HUB_OFFLINE=1 (conftest): answered from the empty cache
    with pytest.raises(ValueError, match="Unknown reward 'aesthetics'.*Hub repo id"):
        resolve_reward("aesthetics")


def test_classifier_scores_the_label_the_prompt_names(tiny, caplog):
    images, vit_dir = _images(2), tiny["root"] / "tiny-vit"
    pixels = tiny["vit_processor"](images=_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = tiny["vit"](pixel_values=pixels).logits
    probs = logits.exp() / logits.exp().sum(dim=1, keepdim=True)

    reward = load_reward(vit_dir)
    prompts = ["a red cat", "a hot dog on a plate", "a TABBY cat at home", "a dog."]
    assert [reward.label_for(p) for p in prompts] == [0, 2, 3, 1]  # whole words, longest name, synonyms
    torch.testing.assert_close(torch.tensor(reward(images, prompts)), probs[range(4), [0, 2, 3, 1]])
    with caplog.at_level("WARNING"):
        scores = reward(images[:2], ["a catalog", "a cat"])  # a prompt naming no label: no score, a warning
        reward(images[:1], ["a catalog"])
    assert math.isnan(scores[0]) and scores[1] == pytest.approx(probs[1, 0].item(), rel=1e-5)
    warnings = [r.getMessage() for r in caplog.records if "names none" in r.getMessage()]
    assert (
        len(warnings) == 1
        and "'a catalog'" in warnings[0]
        and "'cat', 'dog'" in warnings[0]
        and "label=" in warnings[0]
    )

    fixed = load_reward(vit_dir, label="Hot Dog")
    torch.testing.assert_close(torch.tensor(fixed(images, ["anything"] * 4)), probs[:, 2])
    as_double = load_reward(vit_dir, label=1, torch_dtype=torch.float64)
    assert as_double.model.dtype == torch.float64
    scores = torch.tensor(as_double(images, PROMPTS), dtype=torch.float64)
    torch.testing.assert_close(scores, probs[:, 1].double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label='bird' is not one of the classifier's 4 labels"):
        load_reward(vit_dir, label="bird")

    # model.safetensors wins over a pytorch_model.bin holding other weights; the .bin alone loads (weights_only).
    both = tiny["root"] / "tiny-vit-both"
    shutil.copytree(vit_dir, both)
    torch.save({k: v + 0.5 for k, v in tiny["vit"].state_dict().items()}, both / "pytorch_model.bin")
    torch.testing.assert_close(torch.tensor(load_reward(both, label=0)(images, PROMPTS)), probs[:, 0])
    (both / "model.safetensors").unlink()
    from_bin = torch.tensor(load_reward(both, label=0)(images, PROMPTS))
    assert (from_bin - probs[:, 0]).abs().max() > 1e-3


def test_jpeg_rewards_are_ddpo_file_sizes():
    images = _images(3, (3, 3, 24, 24))
    images[0] = 0.5  # flat: compresses well
    sizes = []
    for image in _pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    assert sizes[0] < sizes[1]
    incompressible, compressible = resolve_reward("jpeg_incompressibility"), resolve_reward("jpeg_compressibility")
    assert incompressible(images, PROMPTS[:3]) == pytest.approx(sizes)
    assert compressible(images, PROMPTS[:3]) == pytest.approx([-s for s in sizes])


def test_videos_score_the_mean_over_frames(tiny):
    videos = _images(4, (2, 3, 3, 20, 24))  # B=2 videos of F=3 frames
    prompts = PROMPTS[:2]
    clip = load_reward(tiny["root"] / "tiny-clip")
    vit = load_reward(tiny["root"] / "tiny-vit", label="dog")
    for reward in (clip, vit, resolve_reward("jpeg_incompressibility")):
        per_frame = torch.tensor([reward(videos[:, f], prompts) for f in range(3)])  # (F, B), frames as images
        torch.testing.assert_close(torch.tensor(reward(videos, prompts)), per_frame.mean(dim=0), rtol=1e-5, atol=1e-6)
    cos = _cos(tiny["clip"], tiny["processor"], videos.flatten(0, 1), [p for p in prompts for _ in range(3)])
    expected = (2.5 * cos.clamp(min=0)).view(2, 3).mean(dim=1)
    torch.testing.assert_close(torch.tensor(clip(videos, prompts)), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) or videos \(B, F, 3, H, W\).*\(3, 20, 24\)"):
        clip(videos[0, 0], prompts)


def test_strings_resolve_to_hub_ids_and_paths(tiny, tmp_path, monkeypatch):
    """Hub ids, answered offline from a local Hub cache laid out as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"

    def cache_repo(repo_id, source):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(source, repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)

    mlp = _mlp_state(3)
    cache_repo("openai/clip-vit-large-patch14", tiny["root"] / "tiny-clip")  # the aesthetic default backbone
    cache_repo("trl-lib/ddpo-aesthetic-predictor", _aesthetic_dir(tmp_path, "aes", {"aesthetic-model.pth": mlp}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    images = _images(5)
    aesthetic = resolve_reward("trl-lib/ddpo-aesthetic-predictor")
    assert aesthetic.__name__ == "ddpo-aesthetic-predictor"
    expected = _aesthetic_by_hand(tiny["clip"], tiny["processor"], images, mlp)
    torch.testing.assert_close(torch.tensor(aesthetic(images, PROMPTS)), expected, atol=1e-5, rtol=1e-4)

    funcs = [
        resolve_reward(s) for s in ("openai/clip-vit-large-patch14", str(tiny["root"] / "tiny-vit"), "brightness")
    ]
    assert [f.__name__ for f in funcs] == ["clip-vit-large-patch14", "tiny-vit", "brightness"]
    scores = compute_rewards(funcs, images, ["a cat", "a dog", "a hot dog", "a tabby"], {})
    cos = _cos(tiny["clip"], tiny["processor"], images, ["a cat", "a dog", "a hot dog", "a tabby"])
    torch.testing.assert_close(scores[:, 0], 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-4)
    assert np.allclose(scores[:, 2].numpy(), images.flatten(1).mean(1).numpy(), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_model_follows_the_images_device(tiny):
    reward = load_reward(tiny["root"] / "tiny-vit", label=0)
    cpu_scores = reward(_images(6), PROMPTS)
    gpu_scores = reward(_images(6).cuda(), PROMPTS)
    assert next(reward.model.parameters()).is_cuda
    assert gpu_scores == pytest.approx(cpu_scores, abs=1e-4)
    pinned = load_reward(tiny["root"] / "tiny-vit", label=0, device="cpu")
    assert pinned(_images(6).cuda(), PROMPTS) == pytest.approx(cpu_scores, abs=1e-5)
    assert not next(pinned.model.parameters()).is_cuda


def test_import_paths_in_both_forms_and_their_errors(tmp_path, monkeypatch):
    """`package.module:function` and TRL's `package.module.function` name the same function; a local folder wins
    over the dotted form (a folder may have dots in its name); errors list every accepted form."""
    from ddrl_trl.rewards.builtin import brightness

    assert resolve_reward("ddrl_trl.rewards.builtin:brightness") is brightness
    assert resolve_reward("ddrl_trl.rewards.builtin.brightness") is brightness
    with pytest.raises(
        ValueError,
        match=r"Cannot import reward 'no_such_pkg.rewards.fn': No module named 'no_such_pkg'.*"
        r"'package\.module\.function'",
    ):
        resolve_reward("no_such_pkg.rewards.fn")
    with pytest.raises(ValueError, match=r"Cannot import reward 'ddrl_trl.rewards.builtin.nope'"):
        resolve_reward("ddrl_trl.rewards.builtin.nope")
    with pytest.raises(
        ValueError,
        match=r"Unknown reward 'aesthetic'.*built-in name \(brightness, .*'package\.module:"
        r"function' or 'package\.module\.function'.*runs that code.*Hub repo id",
    ):
        resolve_reward("aesthetic")
    folder = tmp_path / "my.model.v1"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Cannot tell"):  # loaded as a reward model folder, not imported
        resolve_reward("my.model.v1")
