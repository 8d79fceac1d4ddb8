"""The reward service for real: `ddrl-trl serve-reward` on loopback, `RemoteReward` clients, a DDRL training."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from test_trainer import lora, make_trainer
from transformers import TrainerCallback

from ddrl_trl.rewards import brightness
from ddrl_trl.service import RemoteReward
from ddrl_trl.service.wire import encode_samples
from ddrl_trl.testing import tiny_sd_pipeline

TESTS = Path(__file__).resolve().parent
TOKEN = "s3cret-token-for-tests-0123456789"


class RewardServer:
    """`python -m ddrl_trl.cli serve-reward ...` in a subprocess, logging to a file."""

    def __init__(self, tmp_path, reward="brightness", *extra, port=None):
        if port is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = tmp_path / "token.txt"
        self.token_file.write_text(TOKEN + "\n")
        self.log_path = tmp_path / f"server-{self.port}-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "ddrl_trl.cli",
            "serve-reward",
            "--reward",
            reward,
            "--port",
            str(self.port),
            "--token-file",
            str(self.token_file),
            *extra,
        ]
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

    def memory_mb(self, field="VmRSS"):
        """The server process's resident memory now (`VmRSS`) or at its peak so far (`VmHWM`), in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) / 1024

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.log.close()


@pytest.fixture
def server(tmp_path):
    started = []

    def start(*args, port=None):
        started.append(RewardServer(tmp_path, *args, port=port))
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
        [
            sys.executable,
            "-m",
            "ddrl_trl.cli",
            "serve-reward",
            "--reward",
            "no_such_module:f",
            "--token-file",
            str(tmp_path / "missing.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
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

    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(),
        reward=remote,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
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


def submit(srv, images, prompts, **columns):
    body = {"images": encode_samples(images), "prompts": list(prompts), "columns": columns}
    return requests.post(srv.url + "/v1/score", json=body, headers=auth(), timeout=30)


def wait_for(srv, job_id, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{srv.url}/v1/score/{job_id}", headers=auth(), timeout=5).json()
        if status["status"] in ("done", "error"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_scored_jobs_keep_their_scores_not_their_images_and_expire_on_a_timer(server):
    """Before: every finished job kept its decoded float32 images for 10 minutes, expired only when a new request
    came in, and the server's memory grew by ~3 MB per request and stayed."""
    srv = server("brightness", "--result-ttl-s", "3")
    images = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # 3 MiB once decoded
    warm = wait_for(srv, submit(srv, images, ["x"] * 64).json()["id"])
    assert warm["status"] == "done"
    before = srv.memory_mb()
    ids = []
    for _ in range(60):
        ids.append(submit(srv, images, ["x"] * 64).json()["id"])
        assert wait_for(srv, ids[-1])["status"] == "done"
    grown = srv.memory_mb() - before
    assert grown < 60, f"server memory grew by {grown:.0f} MiB over 60 requests of 3 MiB"
    health = srv.health()
    assert health["held_bytes"] == 0 and health["pending_jobs"] == 0 and 0 < health["stored_results"] <= 61
    time.sleep(4.5)  # no request comes in: the timer alone expires the results
    health = srv.health()
    assert health["stored_results"] == 0
    assert requests.get(f"{srv.url}/v1/score/{ids[-1]}", headers=auth(), timeout=5).status_code == 404


def test_pending_jobs_and_their_bytes_are_capped_with_503_and_retry_after(server):
    srv = server(
        "remote_rewards:slow_brightness",
        "--max-pending-jobs",
        "2",
        "--max-batch-samples",
        "1",
        "--max-pending-mb",
        str(2048 / 2**20),
    )
    images = torch.rand(1, 3, 16, 16)  # 768 bytes waiting (uint8: 4× less than the float32 it becomes)
    accepted = [submit(srv, images, ["x"]) for _ in range(2)]
    refused = submit(srv, images, ["x"])
    assert [r.status_code for r in accepted] == [202, 202]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "2 jobs are waiting to be scored (max_pending_jobs=2)" in refused.json()["detail"]
    assert srv.health()["held_bytes"] == 2 * 768
    assert wait_for(srv, accepted[1].json()["id"])["status"] == "done"
    big = submit(srv, torch.rand(1, 3, 32, 32), ["x"])  # 3072 bytes: accepted, as nothing waits
    over = submit(srv, images, ["x"])
    assert big.status_code == 202 and over.status_code == 503
    assert "3072 bytes of samples are waiting to be scored (max_pending_bytes=2048)" in over.json()["detail"]
    assert wait_for(srv, big.json()["id"])["status"] == "done"
    assert submit(srv, images, ["x"]).status_code == 202  # room again


def test_infinite_scores_come_back_as_null_and_stored_scores_are_capped(server):
    srv = server("remote_rewards:infinite_for_bright", "--max-stored-scores", "6")
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.1, 0.9, 0.2)])
    first = submit(srv, images, ["x"] * 3).json()["id"]
    status = wait_for(srv, first)
    assert status["status"] == "done" and status["scores"][1] is None
    assert status["scores"][0] == pytest.approx(0.1, abs=1 / 255)
    assert RemoteReward(srv.url, token=TOKEN)(images, ["x"] * 3)[1] is None  # the trainer counts it invalid
    wait_for(srv, submit(srv, images, ["x"] * 3).json()["id"])  # 9 scores stored > 6: the oldest result goes
    health = srv.health()
    assert (health["stored_scores"], health["stored_results"]) == (6, 2)
    assert requests.get(f"{srv.url}/v1/score/{first}", headers=auth(), timeout=5).status_code == 404


def test_counting_json_values_is_linear_even_for_an_unterminated_string():
    """The pre-scan must never be the attack: a string that never closes, full of escaped quotes, made the first
    pattern restart at every quote (quadratic: 24 KB took 3.6 s, 1 MiB hours) while holding the GIL."""
    from ddrl_trl.service.server import count_json_values

    assert count_json_values(b'{"a": [1, 2, "x,y", "q\\"uo,te"], "b": {"c": null}}') == 10
    result = []
    worker = threading.Thread(target=lambda: result.append(count_json_values(b'"' + b'\\"' * 500_000 + b"\\")))
    worker.start()
    worker.join(timeout=30)
    assert result == [0], "counting did not finish: the scan is not linear"


def test_a_body_of_millions_of_tiny_json_values_is_refused_before_parsing(server):
    """Before: a 60 MiB body of `[]` parsed into millions of Python lists (2.8 GB peak, 2 GB kept)."""
    srv = server("brightness")
    _, body = sample_request()
    payload = json.dumps(body)[:-1].encode() + b', "columns": {"x": [' + b"[]," * 6_000_000 + b"[]]}}"
    peak_before = srv.memory_mb("VmHWM")
    start = time.monotonic()
    response = requests.post(
        srv.url + "/v1/score", data=payload, headers={**auth(), "Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 413 and "JSON values, over the limit of 200000" in response.json()["detail"]
    assert time.monotonic() - start < 20
    assert srv.memory_mb("VmHWM") - peak_before < 150  # ~19 MiB body: a copy or two, not ~1 GB of lists
    assert srv.health()["status"] == "ok"


def test_a_hanging_reward_fails_its_batch_after_the_timeout_and_health_reports_it(server):
    srv = server("remote_rewards:sleeps_on_hang", "--batch-timeout-s", "1", "--max-stuck-batches", "2")
    images = torch.rand(2, 3, 8, 8)
    hung = wait_for(srv, submit(srv, images, ["hang", "x"]).json()["id"])
    assert hung == {**hung, "status": "error", "error": "the reward did not finish within batch_timeout_s=1 s"}
    assert srv.health()["stuck_batches"] == 1 and srv.health()["status"] == "degraded"
    assert wait_for(srv, submit(srv, images, ["x", "y"]).json()["id"])["status"] == "done"  # others still served
    wait_for(srv, submit(srv, images, ["hang", "x"]).json()["id"])
    stuck = requests.get(srv.url + "/health", timeout=5)
    assert stuck.status_code == 503 and stuck.json()["status"] == "stuck" and stuck.json()["stuck_batches"] == 2
    refused = submit(srv, images, ["x", "y"])
    assert refused.status_code == 503 and "the reward is stuck: 2 calls have run past" in refused.json()["detail"]
    with pytest.raises(
        ConnectionError,
        match=r"answered POST /v1/score with an error 1 times .*it said: HTTP 503: "
        r"the reward is stuck",
    ):
        RemoteReward(srv.url, token=TOKEN, retries=0)(images, ["x", "y"])
    srv.process.send_signal(signal.SIGINT)  # "restart the server": Ctrl-C works though two calls still hang
    assert srv.process.wait(timeout=20) is not None


def test_one_bad_request_fails_alone_in_its_micro_batch(server):
    srv = server("remote_rewards:fails_on_boom", "--max-wait-ms", "1000")
    images = torch.rand(2, 3, 8, 8)
    guilty, innocent = submit(srv, images, ["boom", "x"]), submit(srv, images, ["fine", "x"])  # one micro-batch
    assert wait_for(srv, guilty.json()["id"])["error"] == "RuntimeError: the reward model crashed on 'boom'"
    scores = wait_for(srv, innocent.json()["id"])
    assert scores["status"] == "done"
    assert scores["scores"] == pytest.approx(brightness((images * 255).round() / 255, []), abs=1e-6)


def test_idle_and_half_sent_connections_cannot_lock_clients_out(server):
    """Before: connections that never send a request were kept forever; ~1,000 of them locked every client out."""
    srv = server("brightness", "--max-connections", "16", "--request-timeout-s", "2")
    half_headers = socket.create_connection(("127.0.0.1", srv.port))
    half_headers.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Le")
    half_body = socket.create_connection(("127.0.0.1", srv.port))
    half_body.sendall(
        f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f'Content-Length: 1000\r\n\r\n{{"images":'.encode()
    )
    for half in (half_headers, half_body):  # under the limit, nothing is evicted: the deadline closes them
        half.settimeout(10)
        assert half.recv(1024) == b""
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(200)]  # a flood past the limit
    start = time.monotonic()
    images = torch.rand(2, 3, 8, 8)
    assert RemoteReward(srv.url, token=TOKEN, retries=2, backoff=0.1)(images, ["x", "y"])  # served at once
    assert time.monotonic() - start < 3
    for sock in idle:
        sock.settimeout(10)
        assert sock.recv(1) == b""
        sock.close()
    assert srv.process.poll() is None and srv.health()["status"] == "ok"


def test_the_client_submits_again_when_a_restarted_server_lost_its_job(server):
    first = server("remote_rewards:slow_brightness")
    images = torch.rand(2, 3, 8, 8)
    result = {}

    def call():
        result["scores"] = RemoteReward(first.url, token=TOKEN, retries=8, backoff=0.25)(images, ["x", "y"])

    thread = threading.Thread(target=call)
    thread.start()
    while first.health()["requests"] < 1:
        time.sleep(0.05)
    first.kill()  # the job dies with the server
    second = server("remote_rewards:slow_brightness", port=first.port)
    thread.join(timeout=60)
    assert result["scores"] == pytest.approx(brightness((images * 255).round() / 255, []), abs=1e-6)
    assert second.health()["requests"] == 1  # submitted again after the 404


def test_query_strings_are_not_logged_docs_are_not_served_and_a_bad_token_file_is_refused(server, tmp_path):
    srv = server()
    assert requests.get(f"{srv.url}/v1/score/x?token=leaked-secret-123", timeout=5).status_code == 401
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(srv.url + path, timeout=5).status_code == 404, path
    srv.kill()
    log = srv.log_path.read_text()
    assert "leaked-secret-123" not in log and "GET /v1/score/x?<redacted>" in log
    token_file = tmp_path / "bad-token.txt"
    token_file.write_text("first-half\nsecond-half\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddrl_trl.cli",
            "serve-reward",
            "--reward",
            "brightness",
            "--token-file",
            str(token_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "a line break" in result.stderr and "no client could ever match" in result.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "ddrl_trl.cli", "serve-reward", "--help"], capture_output=True, text=True, timeout=120
    )
    assert "is code the server runs" in " ".join(helped.stdout.split())
