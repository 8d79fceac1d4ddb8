"""What a run shows about itself: the held-out loss, validation samples, the hacking monitor, the adaptive data_beta,
the non-finite step guard, trackers, what the trainer reports, and the model card."""
