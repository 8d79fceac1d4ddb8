"""The DDRL step: rollouts with log-probs, their batches and groups, the (guided) policy's forward, the data term, the
reference (base) policy, and the step's metrics."""
