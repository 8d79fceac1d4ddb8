"""Reward functions the test reward servers load by import path (`remote_rewards:<name>`)."""


def fails_on_boom(images, prompts, **columns):
    """Brightness, except that a prompt containing "boom" makes the reward raise."""
    if any("boom" in p for p in prompts):
        raise RuntimeError("the reward model crashed on 'boom'")
    return images.float().flatten(1).mean(1).tolist()


def label_echo(images, prompts, label=None, **columns):
    """Returns the `label` column (checks columns cross the wire)."""
    return [float(v) for v in label]
