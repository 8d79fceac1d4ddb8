"""Reward functions as GRPO users write them train unchanged: keywords (`prompts`, `completions`, `trainer_state`,
dataset columns), async rewards run concurrently on one event loop; today's positional form keeps working; several
rewards on very different scales can be normalised before they are summed."""

import asyncio
import math

import pytest
import torch
from helpers import lora, make_trainer

from ddrl_trl import DDRLConfig
from ddrl_trl.core import aggregate_rewards, group_advantages
from ddrl_trl.rewards import compute_rewards


def trained(trainer) -> dict[str, torch.Tensor]:
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def brightness_of(samples: torch.Tensor) -> list[float]:
    return samples.float().flatten(1).mean(1).tolist()


def test_a_grpo_style_reward_trains_exactly_like_the_positional_form(tmp_path, reference_dataset):
    """TRL calls `reward(prompts=..., completions=..., trainer_state=..., **columns)`: the same scores through that
    form give the same training, and the reward sees the trainer's state and the dataset's columns."""
    seen = []

    def grpo_reward(prompts, completions, trainer_state, label, **kwargs):
        seen.append((trainer_state.global_step, list(label), len(prompts), tuple(completions.shape)))
        return brightness_of(completions)

    def positional(imgs, texts, **columns):  # today's form, with other parameter names: still called positionally
        return brightness_of(imgs)

    grpo = trained(make_trainer(tmp_path / "grpo", reference_dataset, peft_config=lora(), reward=grpo_reward))
    plain = trained(make_trainer(tmp_path / "plain", reference_dataset, peft_config=lora(), reward=positional))
    for name, value in grpo.items():
        torch.testing.assert_close(value, plain[name], rtol=0, atol=0, msg=name)
    # the construction check on 2 references (a fresh TrainerState), then steps 1 and 2 (global_step 0 and 1 while
    # they run); labels are the dataset's, repeated per group
    assert [s[0] for s in seen] == [0, 0, 1] and [s[2] for s in seen] == [2, 4, 4]
    assert seen[1][3] == (4, 3, 32, 32) and all(len(s[1]) == s[2] for s in seen)


def test_async_rewards_run_concurrently_on_one_event_loop(tmp_path, reference_dataset):
    """Two async rewards that can only finish together (each waits for the other's signal) train; they ran on one
    loop, the same at every step, and an async callable class (async `__call__`) counts as async."""
    loops = []

    class Pair:
        def __init__(self):
            self.started = None

        def events(self):
            if self.started is None or self.started[0] is not asyncio.get_running_loop():
                self.started = (asyncio.get_running_loop(), asyncio.Event(), asyncio.Event())
            return self.started

    pair = Pair()

    async def first(prompts, completions, **kwargs):
        loop, mine, other = pair.events()
        loops.append(loop)
        mine.set()
        await asyncio.wait_for(other.wait(), timeout=10)  # only returns if `second` runs meanwhile
        other.clear()
        return brightness_of(completions)

    class Second:
        __name__ = "second"

        async def __call__(self, prompts, completions, **kwargs):
            loop, other, mine = pair.events()
            mine.set()
            await asyncio.wait_for(other.wait(), timeout=10)
            other.clear()
            return [1.0 - v for v in brightness_of(completions)]

    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), reward=[first, Second()])
    trainer.train()
    assert len(loops) == 3 and len(set(map(id, loops))) == 1
    logged = trainer.state.log_history[0]
    assert logged["rewards/first/mean"] + logged["rewards/second/mean"] == pytest.approx(1.0, abs=1e-5)


def test_reward_errors_keep_their_type_and_name_the_function_sync_or_async():
    images = torch.rand(2, 3, 8, 8)

    async def broken(prompts, completions, **kwargs):
        raise KeyError("no such label")

    with pytest.raises(KeyError, match="no such label") as caught:
        compute_rewards([broken], images, ["a", "b"], {})
    assert "raised by reward function 'broken' on a batch of 2 samples" in str(caught.value.__notes__)

    def unfit(samples):
        return [0.0, 0.0]

    with pytest.raises(
        TypeError,
        match=r"Reward function 'unfit' takes \(samples\), which fits neither form: "
        r"reward\(images, prompts, \*\*columns\) or, as TRL's rewards",
    ):
        compute_rewards([unfit], images, ["a", "b"], {})

    def two_named(images, prompts):  # no **kwargs: gets just what it names
        return [len(p) for p in prompts]

    assert compute_rewards([two_named], images, ["a", "bb"], {"label": [1, 2]}).tolist() == [[1.0], [2.0]]


def test_a_dataset_column_named_like_a_reward_keyword_is_refused(tmp_path, reference_dataset):
    data = reference_dataset.rename_column("label", "trainer_state")
    with pytest.raises(
        ValueError,
        match=r"column\(s\) \['trainer_state'\], named like the keywords every reward "
        r"function receives .*rename_column",
    ):
        make_trainer(tmp_path, data, peft_config=lora())


def test_normalize_then_sum_weighs_rewards_of_very_different_scales_by_their_weights():
    """A probability-like reward (spread 0.1) and a file-size reward (spread 1000s): summed first, the large one alone
    decides the ranking; normalised first, each counts by its weight. Values by hand."""
    small = torch.tensor([0.9, 0.8, 0.2, 0.1])  # favours rows 0, 1
    large = torch.tensor([1000.0, 2000.0, 3000.0, 4000.0])  # favours rows 2, 3
    per_func, weights = torch.stack([small, large], dim=1), torch.tensor([1.0, 1.0])

    summed = aggregate_rewards(per_func, weights, 4, "sum_then_normalize")
    adv_summed = group_advantages(summed.rewards, 4, summed.scale_rewards, summed.reward_clip, advantage_clip=None)
    large_alone = group_advantages(large, 4, advantage_clip=None)
    torch.testing.assert_close(adv_summed, large_alone, rtol=1e-3, atol=1e-3)  # the file size alone decides

    normalised = aggregate_rewards(per_func, weights, 4, "normalize_then_sum")
    z_small = (small - small.mean()) / (small.std() + 1e-4)
    z_large = (large - large.mean()) / (large.std() + 1e-4)
    combined = z_small + z_large
    torch.testing.assert_close(normalised.rewards, combined)
    assert normalised.scale_rewards == "batch"
    adv = group_advantages(normalised.rewards, 4, normalised.scale_rewards, None, advantage_clip=None)
    torch.testing.assert_close(adv, (combined - combined.mean()) / (combined.std() + 1e-4))
    # z_small = [.98, .73, -.73, -.98], z_large = [-1.16, -.39, .39, 1.16]: row 1, good on both, now wins
    assert adv.argmax().item() == 1 and adv_summed.argmax().item() == 3
    # weights still weigh: with 3× the weight, the small reward's two favourites (rows 0, 1) come first
    weighted = aggregate_rewards(per_func, torch.tensor([3.0, 1.0]), 4, "normalize_then_sum").rewards
    assert set(weighted.argsort().tolist()[-2:]) == {0, 1}
    # a sample any function could not score is invalid in both modes
    per_func[2, 0] = math.nan
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        assert math.isnan(aggregate_rewards(per_func, weights, 4, mode).rewards[2].item())


def test_normalize_then_sum_trains_and_logs_the_std_it_used(tmp_path, reference_dataset):
    def small(images, prompts, **kwargs):
        return brightness_of(images)

    def large(images, prompts, **kwargs):
        return [1e4 * (1 - v) for v in brightness_of(images)]

    scored = []

    def recording_large(images, prompts, **kwargs):
        scores = large(images, prompts)
        scored.append((brightness_of(images), scores))
        return scores

    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(),
        reward=[small, recording_large],
        multi_objective_aggregation="normalize_then_sum",
        num_generations=4,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward_std" in h]
    for (small_scores, large_scores), log in zip(scored[1:], logs):  # scored[0]: the construction check
        per_func = torch.tensor([small_scores, large_scores]).T
        z = (per_func - per_func.mean(0)) / (per_func.std(0) + 1e-4)  # one group of 4: each reward normalised
        combined = z.sum(1)
        assert log["reward_std"] == pytest.approx(combined.std().item(), rel=1e-4)  # the batch std it divided by
        assert log["reward"] == pytest.approx(per_func.sum(1).mean().item(), rel=1e-5)  # the raw weighted sum
    with pytest.raises(
        ValueError,
        match="multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got 'average'",
    ):
        DDRLConfig(output_dir=str(tmp_path), multi_objective_aggregation="average", report_to="none")


def test_the_reference_column_is_found_by_name_or_given(tmp_path, reference_dataset):
    renamed = reference_dataset.rename_column("image", "photo")
    with pytest.raises(ValueError, match=r"no column 'image' .*set prompt_column / reference_column"):
        make_trainer(tmp_path, renamed, peft_config=lora())
    trainer = make_trainer(tmp_path, renamed, peft_config=lora(), reference_column="photo")
    assert trainer.reference_column == "photo" and "ddrl_ref_latents" in trainer.train_dataset.column_names


class BrightnessModule(torch.nn.Module):
    """A reward model written as an nn.Module, today's positional form: `forward(images, prompts)`."""

    def forward(self, images, prompts):
        return images.float().flatten(1).mean(1)


def wrapped(func):
    """A decorator without functools.wraps: the wrapper only shows `(*args, **kwargs)`."""

    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    "reward",
    [
        BrightnessModule(),
        wrapped(lambda images, prompts, **columns: brightness_of(images)),
        lambda imgs, texts, label: [v + 0 * float(x) for v, x in zip(brightness_of(imgs), label)],
        lambda imgs, texts, *, label, trainer_state: brightness_of(imgs),
    ],
    ids=["nn-module", "args-kwargs-wrapper", "positional-with-a-column", "positional-with-keyword-only"],
)
def test_every_shape_of_the_positional_form_still_works(reward):
    images = torch.rand(3, 3, 8, 8)
    scores = compute_rewards([reward], images, ["a", "b", "c"], {"label": [1, 2, 3]}, {"trainer_state": object()})
    torch.testing.assert_close(scores[:, 0], torch.tensor(brightness_of(images)))


def test_rewards_can_log_metrics_as_in_trl(tmp_path, reference_dataset):
    def reward(prompts, completions, log_metric, log_extra, **kwargs):
        scores = brightness_of(completions)
        log_metric("brightest", max(scores))
        log_extra("note", ["x"] * len(scores))  # no completions table here: accepted, not recorded
        return scores

    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), reward=reward)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(0 < h["brightest"] <= 1 and h["brightest"] >= h["reward"] for h in logs)
