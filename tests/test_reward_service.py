"""The reward service for real: `ddrl-trl serve-reward` on loopback, `RemoteReward` clients, a DDRL training."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from transformers import TrainerCallback

from ddrl_trl.rewards import brightness
from ddrl_trl.service import RemoteReward
from ddrl_trl.service.wire import encode_samples
from ddrl_trl.tiny_pipelines import tiny_sd_pipeline

from test_trainer import lora, make_trainer

TESTS = Path(__file__).resolve().parent
TOKEN = "s3cret-token-for-tests-0123456789"


class RewardServer:
    """`python -m ddrl_trl.cli serve-reward ...` in a subprocess, logging to a file."""

    def __init__(self, tmp_path, reward="brightness", *extra):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = tmp_path / "token.txt"
        self.token_file.write_text(TOKEN + "\n")
        self.log_path = tmp_path / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, "-m", "ddrl_trl.cli", "serve-reward", "--reward", reward, "--port", str(self.port),
               "--token-file", str(self.token_file), *extra]  # fmt: skip
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
            if self.process.poll() is not None:
                break
        raise RuntimeError(f"server did not start: {self.log_path.read_text()}")

    def health(self):
        return requests.get(self.url + "/health", timeout=5).json()

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.log.close()


@pytest.fixture
def server(tmp_path):
    started = []

    def start(*args):
        started.append(RewardServer(tmp_path, *args))
        return started[-1]

    yield start
    for srv in started:
        if srv.process.poll() is None:
            srv.kill()


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def sample_request(batch=2, size=8):
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, {"images": encode_samples(images), "prompts": ["a cat"] * batch}


def test_bearer_token_is_required_and_never_logged(server):
    srv = server()
    _, body = sample_request()
    assert requests.post(srv.url + "/v1/score", json=body, timeout=5).status_code == 401
    wrong = requests.post(srv.url + "/v1/score", json=body, headers=auth("wrong-token-abc"), timeout=5)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    ok = requests.post(srv.url + "/v1/score", json=body, headers=auth(), timeout=5)
    assert ok.status_code == 202
    assert requests.get(f"{srv.url}/v1/score/{ok.json()['id']}", timeout=5).status_code == 401
    assert requests.get(f"{srv.url}/v1/score/{ok.json()['id']}", headers=auth(), timeout=5).status_code == 200
    srv.kill()
    log = srv.log_path.read_text()
    assert "POST /v1/score" in log  # the access log is there...
    assert TOKEN not in log and "wrong-token-abc" not in log  # ...without any token


def test_malformed_requests_get_4xx_with_a_message_and_the_server_survives(server):
    srv = server("brightness", "--max-request-mb", "0.01")
    images, body = sample_request()
    url = srv.url + "/v1/score"

    def post(payload, **kw):
        data = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
        return requests.post(url, data=data, headers={**auth(), "Content-Type": "application/json"}, timeout=5, **kw)

    cases = [
        ("{not json", 400, "not valid JSON"),
        ({"images": body["images"]}, 422, "prompts"),
        ({**body, "images": {**body["images"], "shape": [2, 4, 8, 8]}}, 422, "[B, 3, H, W]"),
        ({**body, "images": {**body["images"], "shape": [2, 3, 8, 9]}}, 422, "needs 432"),
        ({**body, "images": {**body["images"], "data": "%%%"}}, 422, "base64"),
        ({**body, "prompts": ["a cat"]}, 422, "1 prompts for 2 samples"),
        ({**body, "extra": 1}, 422, "extra"),
        ({**body, "prompts": ["x" * 20000] * 2}, 413, "over the limit"),
    ]
    for payload, status, message in cases:
        response = post(payload)
        assert response.status_code == status, (payload if isinstance(payload, str) else list(payload), response.text)
        assert message in response.json()["detail"]
    assert requests.get(srv.url + "/v1/score/nope", headers=auth(), timeout=5).status_code == 404
    assert srv.health()["status"] == "ok" and srv.process.poll() is None


def test_remote_scores_equal_the_local_reward_and_requests_are_micro_batched(server):
    srv = server("brightness", "--max-wait-ms", "300")
    images = torch.rand(8, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    results = [None] * 8

    def client(i):
        results[i] = RemoteReward(srv.url, token_file=srv.token_file)(images[i], ["a cat"] * 4)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        quantized = (images[i] * 255).round() / 255  # what crosses the wire: 8-bit pixels
        assert results[i] == pytest.approx(brightness(quantized, []), abs=1e-6)
    health = srv.health()
    assert health["requests"] == 8 and health["samples"] == 32
    assert health["batches"] < 8  # requests shared reward calls


def test_columns_cross_the_wire_and_reward_errors_fail_the_job_not_the_server(server):
    echo = server("remote_rewards:label_echo")
    images = torch.rand(3, 3, 8, 8)
    assert RemoteReward(echo.url, token=TOKEN)(images, ["a"] * 3, label=[1, 2, 3], image=[object()] * 3) == [1, 2, 3]
    boom = server("remote_rewards:fails_on_boom")
    remote = RemoteReward(boom.url, token=TOKEN)
    with pytest.raises(RuntimeError, match=f"reward service at {boom.url} failed.*crashed on 'boom'"):
        remote(images, ["boom"] * 3)
    assert remote(images, ["fine"] * 3) == pytest.approx(brightness((images * 255).round() / 255, []), abs=1e-6)
    with pytest.raises(PermissionError, match="rejected the token"):
        RemoteReward(boom.url, token="wrong")(images, ["fine"] * 3)


def test_bad_token_file_fails_before_loading_the_reward(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddrl_trl.cli", "serve-reward", "--reward", "no_such_module:f", "--token-file",
         str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Cannot read the token file" in result.stderr and "token_urlsafe" in result.stderr


def test_training_with_a_remote_reward_fails_clearly_when_the_server_dies_and_keeps_the_checkpoint(
    server, tmp_path, reference_dataset
):
    srv = server()
    remote = RemoteReward(srv.url, token_file=srv.token_file, retries=2, backoff=0.05)

    class KillServerAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                srv.kill()

    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), reward=remote, max_steps=4,
                           save_strategy="steps", save_steps=2)  # fmt: skip
    trainer.add_callback(KillServerAfterStep2())
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"reward service at {srv.url} did not answer .* after 3 attempts"):
        trainer.train()
    assert time.monotonic() - start < 60
    assert [h["step"] for h in trainer.state.log_history if "reward" in h] == [1, 2]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(checkpoint))  # intact: it reloads in plain diffusers


def test_bounded_load_all_clients_get_their_own_scores(server):
    srv = server("brightness", "--max-batch-samples", "32")
    failures = []

    def client(seed):
        remote = RemoteReward(srv.url, token=TOKEN)
        for i in range(10):
            images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed * 100 + i))
            expected = brightness((images * 255).round() / 255, [])
            if remote(images, ["x", "y"]) != pytest.approx(expected, abs=1e-6):
                failures.append((seed, i))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert srv.health()["requests"] == 80
