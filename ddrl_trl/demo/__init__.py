"""The embedded digits demo: a small text-to-image diffusers pipeline trained on scikit-learn's real handwritten
digits, an independent digit classifier to judge it, and a deliberately hackable reward (see `digits.py`)."""
