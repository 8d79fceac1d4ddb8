"""The reward service: rewards that live on other machines or GPUs, scored over HTTP (the paper's architecture).

- `server.create_app` / `ddrl-trl serve-reward`: a FastAPI app that queues scoring jobs, micro-batches them across
  requests and runs the reward in a worker thread; its routes and request checks are `server`'s, the queue,
  micro-batches and reward calls `scoring`'s, and the connection limit and request deadline `connections`'.
- `client.RemoteReward`: a reward callable for `reward_funcs` that submits a batch, gets a job id and polls for its
  scores, retrying with exponential backoff.
- `wire`: the JSON payload both sides share.
"""

from .client import RemoteReward

__all__ = ["RemoteReward"]
