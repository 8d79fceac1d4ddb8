"""The reward service for real: `ddrl-trl serve-reward` on loopback, `RemoteReward` clients, a DDRL training."""

import json
import math
import os
import re
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
from helpers import lora, make_trainer
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
        [sys.executable, "-m", "ddrl_trl.cli", "serve-reward", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "is code the server runs" in " ".join(helped.stdout.split())


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_upload(srv, body: bytes, sent: int) -> socket.socket:
    """A raw connection sending an authenticated `POST /v1/score` and the first `sent` bytes of its body, then pausing
    (a slow upload)."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:sent])
    return sock


def read_response(sock: socket.socket, timeout=10) -> tuple[int, dict]:
    """The status and JSON body of the answer on a raw connection; AssertionError if it is closed first."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, complete, body = data.partition(b"\r\n\r\n")
        if complete and len(body) >= int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)):
            return int(head.split()[1]), json.loads(body)
        try:
            chunk = sock.recv(65536)
        except OSError as err:  # reset by the server, or no answer in time
            raise AssertionError(f"no answer on the connection ({err!r}; got {data!r})") from None
        if not chunk:
            raise AssertionError(f"the server closed the connection without answering (got {data!r})")
        data += chunk


def wait_for_health(srv, key, value, timeout=10):
    deadline = time.monotonic() + timeout
    while srv.health()[key] != value:
        assert time.monotonic() < deadline, (key, value, srv.health())
        time.sleep(0.05)


def is_closed(sock: socket.socket, timeout=5) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_flood_of_idle_connections_evicts_them_not_a_paused_authenticated_upload(server):
    """Before: past --max-connections the connection quiet for longest went first, i.e. an upload paused mid-body,
    while the never-spoken sockets of the flood stayed."""
    srv = server("brightness", "--max-connections", "8", "--request-timeout-s", "30")
    _, body = sample_request()
    payload = json.dumps(body).encode()
    upload = start_upload(srv, payload, sent=len(payload) // 2)
    time.sleep(0.3)
    assert srv.health()["status"] == "ok"  # the server has taken the headers and half the body by now
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(40)]  # a flood past the limit of 8
    upload.sendall(payload[len(payload) // 2 :])
    status, answer = read_response(upload)
    assert (status, answer["status"]) == (202, "queued")  # the paused upload completed and was answered
    assert all(is_closed(sock) for sock in idle[:32])  # the oldest never-spoken sockets made room
    assert wait_for(srv, answer["id"])["status"] == "done"
    for sock in [upload, *idle]:
        sock.close()


def test_a_short_token_file_is_refused_in_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    import ddrl_trl.service.server as server_module
    from ddrl_trl.cli.command import main

    def serve(*args, **kwargs):
        raise AssertionError("the server started with a one-character token")

    monkeypatch.setattr(server_module, "serve", serve)
    token_file = tmp_path / "short.txt"
    token_file.write_text("x\n")
    with pytest.raises(SystemExit) as exited:
        main(["serve-reward", "--reward", "brightness", "--token-file", str(token_file)])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddrl-trl serve-reward: error: ")
    assert "holds a 1-character token" in lines[0] and "at least 16 characters" in lines[0]
    assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in lines[0]
    token_file.write_text("x" * 15)
    with pytest.raises(ValueError, match="holds a 15-character token"):
        server_module.read_token_file(str(token_file))
    token_file.write_text("x" * 16 + "\n")
    assert server_module.read_token_file(str(token_file)) == "x" * 16


def test_every_way_of_starting_the_server_refuses_a_short_token(monkeypatch):
    """Before, only `read_token_file` (the CLI) enforced the 16-character minimum: `create_app(...)` and
    `serve(token=...)` took a 1-character token. Now `create_app` refuses it, with the token file's message, so
    `serve` fails before uvicorn starts."""
    import uvicorn

    import ddrl_trl.service.server as server_module

    def run(*args, **kwargs):
        raise AssertionError("uvicorn started with a one-character token")

    monkeypatch.setattr(uvicorn, "run", run)
    for short in ("x", "y" * 15):
        with pytest.raises(ValueError) as refused:
            server_module.create_app(brightness, short)
        message = str(refused.value)
        assert message.startswith(f"The reward server's token (token=) holds a {len(short)}-character token: ")
        assert "use at least 16 characters" in message and "secrets.token_urlsafe(32)" in message
    with pytest.raises(ValueError, match="holds a 1-character token: use at least 16 characters"):
        server_module.serve(brightness, "x", "127.0.0.1", 0)
    with pytest.raises(ValueError, match="is empty"):
        server_module.create_app(brightness, "")
    assert server_module.create_app(brightness, "z" * 16) is not None


def test_the_client_never_sleeps_past_its_timeout_for_retry_after_and_keeps_the_servers_reason(server):
    """Before: a stuck server's Retry-After of 30 s was honoured past RemoteReward(timeout=2)."""
    srv = server("remote_rewards:sleeps_on_hang", "--batch-timeout-s", "0.5", "--max-stuck-batches", "1")
    images = torch.rand(2, 3, 8, 8)
    assert wait_for(srv, submit(srv, images, ["hang", "x"]).json()["id"])["status"] == "error"
    refused = submit(srv, images, ["x", "y"])
    assert refused.status_code == 503 and refused.headers["retry-after"] == "30"
    outcome = {}

    def call():
        start = time.monotonic()
        try:
            RemoteReward(srv.url, token=TOKEN, timeout=2)(images, ["x", "y"])
        except ConnectionError as err:
            outcome["error"] = str(err)
        outcome["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=15)
    assert "elapsed" in outcome, "RemoteReward(timeout=2) was still waiting after 15 s"
    assert 1.9 < outcome["elapsed"] < 3.5
    message = outcome["error"]
    assert "the call's timeout=2 s" in message
    assert "it said: HTTP 503: the reward is stuck: 1 calls have run past" in message
    assert "restart the server" in message
    assert "--resume_from_checkpoint latest" in message


def test_retries_last_a_time_budget_and_the_final_error_says_how_long_and_how_to_resume():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a stopped server
    assert RemoteReward(url, token=TOKEN).retry_budget_s >= 120  # longer than a reward model takes to restart
    for bad in (0, -1.0, math.inf, math.nan, "300"):
        with pytest.raises(ValueError, match=r"retry_budget_s=.* must be a finite number of seconds > 0"):
            RemoteReward(url, token=TOKEN, retry_budget_s=bad)
    remote = RemoteReward(url, token=TOKEN, retry_budget_s=1.5, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as raised:
        remote(torch.rand(1, 3, 8, 8), ["x"])
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 2.5
    message = str(raised.value)
    attempts = int(re.search(r"did not answer POST /v1/score after (\d+) attempts over \d+\.\d s", message).group(1))
    assert attempts >= 5  # backoff 0.05, 0.1, 0.2, ... within the budget
    assert "retry_budget_s=1.5 ran out" in message and "ConnectionError" in message
    assert "can be resumed from its last checkpoint" in message and "--resume_from_checkpoint latest" in message


def test_uploads_in_flight_are_bounded_in_bytes(server):
    """Before: nothing bounded the bytes of bodies being received at once (256 connections × 64 MiB)."""
    srv = server("brightness", "--max-inflight-upload-mb", str(4096 / 2**20), "--request-timeout-s", "30")
    _, body = sample_request()
    small = json.dumps(body).encode()
    paused = small + b" " * (3600 - len(small))  # 3,600 bytes declared, 100 sent
    upload = start_upload(srv, paused, sent=100)
    wait_for_health(srv, "uploading_bytes", 3600)
    headers = {**auth(), "Content-Type": "application/json"}
    refused = requests.post(srv.url + "/v1/score", data=small, headers=headers, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert (
        f"3600 bytes of other uploads are being received; {len(small)} more would pass "
        "max_inflight_upload_bytes=4096" in refused.json()["detail"]
    )
    alone = requests.post(srv.url + "/v1/score", data=small + b" " * 4000, headers=headers, timeout=10)
    assert alone.status_code == 413
    assert f"{len(small) + 4000}-byte body is over max_inflight_upload_bytes=4096" in alone.json()["detail"]
    upload.sendall(paused[100:])
    assert read_response(upload)[0] == 202
    upload.close()
    assert srv.health()["uploading_bytes"] == 0
    assert requests.post(srv.url + "/v1/score", data=small, headers=headers, timeout=10).status_code == 202
    dropped = start_upload(srv, paused, sent=100)
    wait_for_health(srv, "uploading_bytes", 3600)
    dropped.close()  # a client that goes away mid-body gives its share back
    wait_for_health(srv, "uploading_bytes", 0)
