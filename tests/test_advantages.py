"""Group-relative advantages against hand-computed values."""

import math

import pytest
import torch

from ddrl_trl.core import combine_rewards, group_advantages, group_reward_std

EPS = 1e-4


def test_group_normalisation_matches_hand_computation():
    # group 1: mean 2.5, unbiased std sqrt(5/3); group 2: mean 0, std sqrt(2)
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, -1.0, 1.0, 1.0, -1.0])
    adv = group_advantages(rewards, num_generations=4)
    s1, s2 = math.sqrt(5 / 3), math.sqrt(4 / 3)
    expected = [-1.5 / (s1 + EPS), -0.5 / (s1 + EPS), 0.5 / (s1 + EPS), 1.5 / (s1 + EPS)]
    expected += [-1 / (s2 + EPS), 1 / (s2 + EPS), 1 / (s2 + EPS), -1 / (s2 + EPS)]
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)


def test_invalid_rewards_take_the_group_mean_and_get_zero_advantage():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    adv = group_advantages(rewards, num_generations=4)
    std = math.sqrt(8 / 3)  # values become [1, 3, 3, 5]
    torch.testing.assert_close(adv, torch.tensor([-2, 0, 0, 2]) / (std + EPS), rtol=0, atol=1e-6)


def test_all_invalid_group_gets_zero_advantages():
    adv = group_advantages(torch.tensor([float("nan")] * 2 + [0.0, 1.0]), num_generations=2)
    assert adv[:2].tolist() == [0.0, 0.0]
    assert adv[2] < 0 < adv[3]


def test_reward_clip_then_normalise():
    adv = group_advantages(torch.tensor([10.0, 0.0]), num_generations=2, reward_clip=5.0)
    std = math.sqrt(12.5)  # [5, 0]
    torch.testing.assert_close(adv, torch.tensor([2.5, -2.5]) / (std + EPS))


def test_exp_transform_and_advantage_clip():
    rewards = torch.tensor([0.0, 1.0])
    base = 0.5 / (math.sqrt(0.5) + EPS)
    adv = group_advantages(rewards, num_generations=2, exp_transform=True, advantage_clip=None)
    torch.testing.assert_close(adv, torch.tensor([-math.exp(base), -math.exp(-base)]))
    clipped = group_advantages(rewards, num_generations=2, exp_transform=True, advantage_clip=1.0)
    torch.testing.assert_close(clipped, torch.tensor([-1.0, -math.exp(-base)]))


def test_scale_none_and_batch():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale_rewards="none", reward_clip=None), torch.tensor([-1.0, 1.0, -2.0, 2.0])
    )
    batch_std = torch.tensor([0.0, 2.0, 10.0, 14.0]).std().item()
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale_rewards="batch", reward_clip=None, advantage_clip=None),
        torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (batch_std + EPS),
    )


def test_bad_shapes_and_modes_are_rejected():
    with pytest.raises(ValueError, match="multiple of num_generations=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="sum")


def test_combine_rewards_weighs_and_propagates_invalid():
    per_func = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [0.5, 4.0]])
    combined = combine_rewards(per_func, torch.tensor([2.0, -1.0]))
    assert combined[0].item() == 0.0 and combined[2].item() == -3.0
    assert math.isnan(combined[1].item())


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_infinite_rewards_are_invalid_like_nan_even_when_clipped(bad):
    """±inf is no score: it takes the group mean like NaN (clipping must not turn +inf into a valid 5.0)."""
    rewards = torch.tensor([1.0, bad, 3.0, 5.0])
    std = math.sqrt(8 / 3)  # values become [1, 3, 3, 5]
    for clip in (None, 5.0):
        adv = group_advantages(rewards, num_generations=4, reward_clip=clip)
        torch.testing.assert_close(adv, torch.tensor([-2, 0, 0, 2]) / (std + EPS), rtol=0, atol=1e-6)
        assert group_reward_std(rewards, 4, reward_clip=clip).tolist() == pytest.approx([std])


def test_reward_std_is_the_one_the_advantages_divide_by():
    rewards = torch.tensor([1.0, math.nan, 3.0, 5.0, 0.0, 2.0, 10.0, math.inf])  # groups [1, 3, 3, 5], [0, 2, 10, 4]
    filled = torch.tensor([1.0, 3.0, 3.0, 5.0, 0.0, 2.0, 10.0, 4.0])
    group = [math.sqrt(8 / 3), filled[4:].std().item()]
    assert group_reward_std(rewards, 4, "group").tolist() == pytest.approx(group)
    assert group_reward_std(rewards, 4, "none").tolist() == pytest.approx(group)  # reported as TRL does
    assert group_reward_std(rewards, 4, "batch").tolist() == pytest.approx([filled.std().item()] * 2)
    centred = filled.view(2, 4) - filled.view(2, 4).mean(dim=1, keepdim=True)
    torch.testing.assert_close(
        group_advantages(rewards, 4, "batch", advantage_clip=None), (centred / (filled.std() + EPS)).reshape(-1)
    )


def test_rewards_at_the_edge_of_float32_do_not_overflow_the_group_statistics():
    adv = group_advantages(torch.tensor([3e38, 3e38, 1.0, 2.0]), num_generations=4, advantage_clip=None)
    assert torch.isfinite(adv).all()
    assert adv[0] > 0 and adv[0] == adv[1] and adv[2] < 0
