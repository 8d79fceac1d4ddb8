"""Rewards scored in the background while the next chunk of groups is rolled out (`overlap_rewards`)."""

import threading
import time

import torch
from helpers import lora, make_trainer


def test_async_scoring_overlaps_rollout_and_leaves_results_unchanged(tmp_path, reference_dataset):
    def run(overlap_rewards, out):
        events = {"threads": set(), "overlapped": []}
        adapter = None  # set once the trainer exists (the reward is also called on reference images at construction)

        def slow_reward(images, prompts, **_):
            if adapter is not None:
                events["threads"].add(threading.current_thread().name)
                before = adapter.calls
                time.sleep(0.2)  # a slow reward model: the rollout of the next chunk should proceed meanwhile
                events["overlapped"].append(adapter.calls > before)
            return images.float().flatten(1).mean(1).tolist()

        trainer = make_trainer(
            tmp_path / out,
            reference_dataset,
            peft_config=lora(),
            reward=slow_reward,
            per_device_train_batch_size=6,
            num_generations=2,
            max_steps=2,
            overlap_rewards=overlap_rewards,
            rollout_chunk_groups=1,
        )
        adapter, predict = trainer.adapter, trainer.adapter.predict
        adapter.calls = 0

        def counting_predict(*args, **kwargs):
            adapter.calls += 1
            return predict(*args, **kwargs)

        adapter.predict = counting_predict
        trainer.train()
        weights = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
        return trainer, events, weights

    sync_trainer, sync_events, sync_weights = run(False, "sync")
    async_trainer, async_events, async_weights = run(True, "async")
    # every reward call ran in the one background thread; the first chunk of each step (3 chunks per step) was scored
    # while the next chunk was being rolled out (the denoiser kept being called during the reward)
    assert async_events["threads"] == {"ddrl-reward_0"}
    assert len(async_events["overlapped"]) == 6
    assert async_events["overlapped"][0] and async_events["overlapped"][3]
    assert sync_events["threads"] == {threading.main_thread().name} and not any(sync_events["overlapped"])
    # only the timing changed
    for a, b in zip(sync_weights, async_weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sync_trainer.state.log_history[0]["reward"] == async_trainer.state.log_history[0]["reward"]


def test_chunked_rollout_is_reproducible_and_scores_every_row(tmp_path, reference_dataset):
    rows_seen = []

    def reward(images, prompts, **columns):
        rows_seen.append((len(prompts), tuple(columns["label"])))
        return images.float().flatten(1).mean(1).tolist()

    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(),
        reward=reward,
        per_device_train_batch_size=6,
        max_steps=1,
        rollout_chunk_groups=2,
    )
    rows_seen.clear()  # drop the construction-time check on reference images
    trainer.train()
    # 3 groups of 2 in chunks of 2 groups: 4 rows then 2, each with its own rows' columns
    assert [n for n, _ in rows_seen] == [4, 2]
    assert all(len(labels) == n for n, labels in rows_seen)
