"""The DDRL step: the (guided) policy and its base-weights twin (`policy`, `reference`), rollouts with log-probs
(`rollout`), the micro-step's rollout batch (`collector`) and its groups across processes (`groups`), the loss of a
trained step (`loss`) and its data term (`data_term`), the step's metrics (`metrics`), and observation points for
tests and tools (`hooks`)."""
