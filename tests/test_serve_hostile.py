"""``layerdecode serve`` under hostile load: limits known before work, a bounded drain, hostile
bodies, queue timeouts, and clients that leave while their prompt is prefilled.

The model is the tiny llama saved with a 16,384-token context; the server prefills 256
tokens per forward pass, so a prompt of a few thousand words takes many chunks (4,096 words:
about 6 s alone on a busy 2-core CPU, 11,000 words: about a minute). Times are compared
with the prefill time measured in the same run where they can be.
"""

from __future__ import annotations

import json
import math
import signal
import socket
import threading
import time

import pytest

from .test_serve import HOST, Server, open_stream, read_events

pytestmark = pytest.mark.slow  # servers in other processes

CONTEXT = 16_384
STEP = 256  # --prefill-step-size
LONG = 4096  # words (one token each) of the long prompt: 16 prefill chunks
CHAT = [{"role": "user", "content": "w1 w2 w3"}]


def words(n: int) -> str:
    return " ".join(f"w{5 + i % 200}" for i in range(n))


class LoggedServer(Server):
    """A :class:`Server` whose stderr is read as it comes (``log``), so it can be searched."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except Exception:  # noqa: BLE001 - a server that hangs is killed, the test fails
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        return super().stop(sig, timeout)

    def health(self) -> tuple[int, dict]:
        return self.get("/health")

    def wait_health(self, key: str, value: int, timeout: float = 30) -> float:
        """Seconds until /health shows ``key == value`` (the test fails after ``timeout``)."""
        start = time.monotonic()
        while self.health()[1][key] != value:
            assert time.monotonic() - start < timeout, f"/health never showed {key}={value}"
            time.sleep(0.02)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    from layerdecode.testing import save_tiny_model

    path = tmp_path_factory.mktemp("hostile") / "tiny-long"
    return save_tiny_model(path, max_position_embeddings=CONTEXT)


SERVER_ARGS = (
    "--max-batch", "2", "--max-queue", "4", "--queue-timeout", "1",
    "--prefill-step-size", str(STEP), "--max-prompt-tokens", "12000",
    "--max-tokens-limit", "8000",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(long_model_dir):
    with LoggedServer(long_model_dir, *SERVER_ARGS) as s:
        yield s


def timed_post(server: Server, body: dict, path: str = "/v1/completions"):
    start = time.monotonic()
    status, data, headers = server.post(path, body)
    return status, data, headers, time.monotonic() - start


# --- limits known before work -----------------------------------------------------------------


def test_a_prompt_over_the_context_is_a_400_at_once(server):
    status, data, _, took = timed_post(server, {"prompt": words(20_000), "max_tokens": 4})
    assert status == 400 and took < 1.0, (status, took)
    error = data["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    message = error["message"]
    assert "20,00" in message and "12,000" in message and "16,384" in message, message
    assert "--max-prompt-tokens 12000" in message

    chat = {"messages": [{"role": "user", "content": words(13_000)}]}
    status, data, _, took = timed_post(server, chat, "/v1/chat/completions")
    assert status == 400 and took < 1.0 and data["error"]["param"] == "messages"

    # Within --max-prompt-tokens, but the answer it asks for does not fit in the context.
    status, data, _, took = timed_post(server, {"prompt": words(11_000), "max_tokens": 6000})
    assert status == 400 and took < 1.0, (status, took)
    message = data["error"]["message"]
    assert "11,00" in message and "6,000" in message and "16,384" in message, message
    assert data["error"]["param"] == "max_tokens"
    assert server.health()[1]["running"] == 0


# --- prefill in chunks: streams go on, a client that leaves frees its work ----------------


def test_a_stream_keeps_receiving_tokens_while_a_long_prompt_prefills(server):
    conn, response = open_stream(server, {"prompt": "w1", "max_tokens": 8000})
    try:
        assert len(read_events(response, 2)) == 2
        done = {}
        thread = threading.Thread(
            target=lambda: done.update(
                answer=timed_post(server, {"prompt": words(LONG), "max_tokens": 1})
            )
        )
        arrivals = [time.monotonic()]
        thread.start()
        while thread.is_alive():
            assert read_events(response, 1), "the stream ended early"
            arrivals.append(time.monotonic())
        thread.join()
    finally:
        conn.close()
    status, data, _, took = done["answer"]
    assert status == 200 and data["usage"]["prompt_tokens"] >= LONG
    gap = max(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    # Whole, the prefill would stall the stream for about `took`; in chunks, for one chunk:
    # chunks attend to more tokens as the prompt fills, the last costs about twice the mean.
    chunk = 2 * took / math.ceil(LONG / STEP)
    assert gap < 3 * chunk + 0.5 and gap < took / 2, (gap, took)


def test_a_client_that_leaves_during_prefill_frees_its_work(server):
    server.wait_health("running", 0)
    conn = server.connection()
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": words(11_000)}))
    server.wait_health("running", 1)
    time.sleep(0.3)  # into the prefill, whose whole takes about a minute
    conn.close()
    freed = server.wait_health("running", 0)
    # About a second to notice the client left, then the end of one of the first chunks.
    assert freed < 2.5, freed
    status, data, _, took = timed_post(server, {"prompt": "w1", "max_tokens": 2})
    assert status == 200 and took < 1.0, (status, took)


# --- the queue ----------------------------------------------------------------------------


def test_a_request_waiting_past_the_queue_timeout_is_a_503_and_health_says_so(server):
    server.wait_health("running", 0)
    opened = time.monotonic()
    streams = [open_stream(server, {"prompt": "w1", "max_tokens": 8000}) for _ in range(2)]
    try:
        for _, response in streams:  # both batch slots are taken
            assert len(read_events(response, 1)) == 1
        status, health = server.health()
        assert status == 200 and health["status"] == "ok"
        assert health["running"] == 2 and health["waiting"] == 0
        for stream in (False, True):
            body = {"prompt": "w1", "max_tokens": 2, "stream": stream}
            status, data, headers, took = timed_post(server, body)
            assert status == 503 and 0.9 < took < 3.0, (status, took)
            assert headers.get("retry-after") == "5" and data["error"]["code"] == "queue_timeout"
            assert "--queue-timeout 1" in data["error"]["message"]
        waiting = threading.Thread(target=timed_post, args=(server, {"prompt": "w1"}))
        waiting.start()
        server.wait_health("waiting", 1)
        time.sleep(0.5)
        health = server.health()[1]
        assert health["running"] == 2 and health["waiting"] == 1
        assert abs(health["oldest_age_s"] - (time.monotonic() - opened)) < 0.5, health
        waiting.join(5)
    finally:
        for conn, _ in streams:
            conn.close()
    assert server.wait_health("running", 0, timeout=5) < 3


def test_a_refused_list_of_prompts_leaves_no_work_behind(server):
    server.wait_health("running", 0)
    body = {"prompt": ["w1"] * 64, "max_tokens": 2000}
    status, data, _ = server.post("/v1/completions", body)
    assert status == 429 and data["error"]["type"] == "rate_limit_error"
    assert server.wait_health("running", 0, timeout=5) < 2
    assert server.health()[1]["waiting"] == 0


# --- hostile bodies -----------------------------------------------------------------------


def raw_request(body: bytes, *, length: int | None = None) -> bytes:
    """A POST whose Content-Length may promise more than ``body``."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length or len(body)}\r\n\r\n"
    )
    return head.encode() + body


def send_and_leave(server: Server, data: bytes, *, half_close: bool) -> bytes:
    """Send ``data``, then hang up, or half-close and read what comes back."""
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(data)
        if not half_close:
            return b""
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


TOO_BIG = [
    ({"messages": CHAT * 2049}, "messages", "2048"),
    ({"messages": CHAT, "stop": ["w1"] * 17}, "stop", "16"),
    ({"messages": CHAT, "stop": "w" * 257}, "stop", "256"),
    ({"messages": CHAT, "tools": [{"type": "function"}] * 129}, "tools", "128"),
    ({"messages": CHAT, "model": "m" * 257}, "model", "256"),
    ({"messages": CHAT, "strategy": "s" * 257}, "strategy", "256"),
    ({"messages": [{"role": "r" * 257, "content": "w1"}]}, "messages", "256"),
    ({"messages": CHAT, "strategy_params": dict.fromkeys("abcdefghijklmnopqrstuvwxyzABCDEFG", 1)},
     "strategy_params", "32"),
    ({"messages": CHAT, "strategy_params": {"window": "9" * 5000}}, "strategy_params", "4096"),
    ({"messages": CHAT, "chat_template_kwargs": {"x": "y" * 5000}}, "chat_template_kwargs", "4096"),
]  # fmt: skip


def test_hostile_bodies_get_a_4xx_and_leave_no_traceback(server):
    # 50,000 nested arrays: a 400 and the connection still serves the next request.
    conn = server.connection()
    try:
        nested = b"[" * 50_000 + b"]" * 50_000
        conn.request("POST", "/v1/chat/completions", body=nested)
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 400 and "nested too deeply" in error["message"]
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "w1", "max_tokens": 2}))
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"]
    finally:
        conn.close()
    deep = {"messages": CHAT, "strategy_params": {"window": json.loads("[" * 70 + "]" * 70)}}
    status, data, _ = server.post("/v1/chat/completions", deep)
    assert status == 400 and "nested too deeply" in data["error"]["message"]
    status, data, _ = server.post("/v1/chat/completions", b'{"messages": "\xff\xfe"}')
    assert status == 400 and "UTF-8" in data["error"]["message"]

    for body, param, limit in TOO_BIG:
        status, data, _ = server.post("/v1/chat/completions", body)
        assert status == 400, (param, data)
        assert data["error"]["param"] == param and limit in data["error"]["message"], data

    # A body cut short: the client hangs up, or half-closes and waits for an answer.
    partial = raw_request(b'{"messages": [{"role": "user", "con', length=4000)
    send_and_leave(server, partial, half_close=False)
    answer = send_and_leave(server, partial, half_close=True)
    assert not answer or answer.startswith(b"HTTP/1.1 4"), answer[:80]
    assert server.health()[0] == 200
    time.sleep(0.3)  # what the server had to say is in its log
    assert "Traceback" not in server.log, server.log
    assert len(server.lines) < 10, server.log


# --- the drain ----------------------------------------------------------------------------


def test_sigterm_ends_long_work_within_the_drain_timeout(long_model_dir):
    drain = 2.0
    s = LoggedServer(
        long_model_dir, "--drain-timeout", "2", "--prefill-step-size", str(STEP),
        "--max-tokens-limit", "8000",
    )  # fmt: skip
    try:
        conn, response = open_stream(s, {"prompt": "w1", "max_tokens": 8000})
        assert len(read_events(response, 2)) == 2
        prefilling = {}
        thread = threading.Thread(
            target=lambda: prefilling.update(
                status=s.post("/v1/completions", {"prompt": words(3 * LONG), "max_tokens": 1})[0]
            )
        )
        thread.start()
        s.wait_health("running", 2)
        s.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        time.sleep(0.2)
        status, health = s.health()
        assert status == 503 and health["status"] == "draining" and health["running"] == 2
        status, data, _ = s.post("/v1/completions", {"prompt": "w1", "max_tokens": 2})
        assert status == 503 and "shutting down" in data["error"]["message"]
        rest = read_events(response)
        conn.close()
        ended = time.monotonic() - sent
        assert rest[-1] == "[DONE]" and "shutting down" in rest[-2]["error"]["message"], rest[-2:]
        assert drain - 0.1 < ended < drain + 1.0, ended
        thread.join(10)
        assert prefilling["status"] == 503
        s.proc.wait(drain + 5 - (time.monotonic() - sent))
        exited = time.monotonic() - sent
    finally:
        code = s.stop()
    assert code == 0 and exited < drain + 3.0, (code, exited)
    assert "Traceback" not in s.log, s.log


def test_a_waiting_client_that_leaves_and_a_second_signal(long_model_dir):
    s = LoggedServer(long_model_dir, "--max-batch", "1", "--max-tokens-limit", "8000")
    try:
        conn, response = open_stream(s, {"prompt": "w1", "max_tokens": 8000})
        assert len(read_events(response, 2)) == 2
        # A request waiting for the one batch slot whose client leaves: out of the queue.
        waiting = s.connection()
        waiting.request("POST", "/v1/completions", body=json.dumps({"prompt": "w2"}))
        s.wait_health("waiting", 1)
        waiting.close()
        assert s.wait_health("waiting", 0) < 1.5
        assert s.health()[1]["running"] == 1

        s.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert s.health()[1]["status"] == "draining"
        s.proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        s.proc.wait(10)
        exited = time.monotonic() - sent
        conn.close()
    finally:
        code = s.stop()
    assert code == 0 and exited < 1.0, (code, exited)
