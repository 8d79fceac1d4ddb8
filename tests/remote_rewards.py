"""Reward functions that tests load by import path (`remote_rewards:<name>` or `remote_rewards.<name>`): in reward
servers and in the example scripts."""

import math
import os
import time


def fails_on_boom(images, prompts, **columns):
    """Brightness, except that a prompt containing "boom" makes the reward raise."""
    if any("boom" in p for p in prompts):
        raise RuntimeError("the reward model crashed on 'boom'")
    return images.float().flatten(1).mean(1).tolist()


def label_echo(images, prompts, label=None, **columns):
    """Returns the `label` column (checks columns cross the wire)."""
    return [float(v) for v in label]


def brightness_until_flagged(images, prompts, **columns):
    """Brightness, but hangs for an hour once the path in $DDRL_TEST_HANG_WHEN exists (to interrupt a scripted run at
    a known point and kill it); each call appends a line to $DDRL_TEST_CALL_LOG, if set."""
    if os.environ.get("DDRL_TEST_CALL_LOG"):
        with open(os.environ["DDRL_TEST_CALL_LOG"], "a") as log:
            log.write(f"{len(prompts)}\n")
    flag = os.environ.get("DDRL_TEST_HANG_WHEN")
    if flag and os.path.exists(flag):
        time.sleep(3600)
    return images.float().flatten(1).mean(1).tolist()


def infinite_for_bright(images, prompts, **columns):
    """+inf for images brighter than average, else their brightness: a reward that overflows on some samples."""
    values = images.float().flatten(1).mean(1)
    return [math.inf if v > values.mean() else float(v) for v in values]


def sleeps_on_hang(images, prompts, **columns):
    """Brightness, but a prompt containing "hang" makes the call block for an hour."""
    if any("hang" in p for p in prompts):
        time.sleep(3600)
    return images.float().flatten(1).mean(1).tolist()


def slow_brightness(images, prompts, **columns):
    """Brightness after 1.5 s (a slow reward model)."""
    time.sleep(1.5)
    return images.float().flatten(1).mean(1).tolist()
