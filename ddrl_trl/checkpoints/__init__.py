"""Saving and resuming: weights in diffusers' formats, atomic checkpoints, exact resume, and the checks on both."""
