"""``layerdecode serve`` as users meet it: the ``openai`` client against a real server.

Each server is started by the test as a subprocess on a free 127.0.0.1 port with a tiny
model; raw HTTP (invalid JSON, oversized bodies, disconnects) goes through ``http.client``.
"""

from __future__ import annotations

import http.client
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

# slow: servers in other processes
pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (dev extra)")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")

HOST = "127.0.0.1"
CHAT = [{"role": "user", "content": "w1 w2 w3"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """``layerdecode serve`` in a subprocess; ``with Server(model) as s: s.client()...``."""

    def __init__(self, model: str | Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "layerdecode.cli", "serve", "--model", str(model)]
        cmd += ["--host", HOST, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start in time")

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        conn = self.connection()
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def post(self, path: str, body: bytes | dict, headers: dict[str, str] | None = None):
        """(status, JSON body, response headers) of a raw POST."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = self.connection()
        try:
            conn.request(
                "POST",
                path,
                body=data,
                headers={"Content-Type": "application/json", **(headers or {})},
            )
            response = conn.getresponse()
            return response.status, json.loads(response.read()), dict(response.getheaders())
        finally:
            conn.close()

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def open_stream(server: Server, body: dict, path: str = "/v1/completions"):
    """A streaming request left open: (connection, response) to read a few lines from."""
    conn = server.connection()
    conn.request(
        "POST",
        path,
        body=json.dumps({**body, "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    return conn, conn.getresponse()


def read_events(response, count: int | None = None) -> list[dict | str]:
    events: list[dict | str] = []
    while count is None or len(events) < count:
        line = response.readline()
        if not line:
            break
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
            if data == "[DONE]":
                break
    return events


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from layerdecode.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("other") / "tiny-other", seed=1)


@pytest.fixture(scope="module")
def server(tiny_model_dir, other_model_dir):
    args = ["--max-tokens-limit", "64", "--allow-model-switch", str(other_model_dir)]
    with Server(tiny_model_dir, *args) as s:
        yield s


@pytest.fixture(scope="module")
def model_id(server):
    return server.client().models.list().data[0].id


# --- the endpoints, through the openai client -----------------------------------------------


def test_models_and_health(server, tiny_model_dir):
    assert [m.id for m in server.client().models.list().data] == ["tiny-llama", "tiny-other"]
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny-llama"


def test_only_the_models_the_server_was_started_with(server):
    client = server.client()
    answers = {
        name: client.completions.create(model=name, prompt="w4 w5", max_tokens=6)
        for name in ("tiny-llama", "tiny-other")
    }
    assert {name: a.model for name, a in answers.items()} == {n: n for n in answers}
    assert answers["tiny-llama"].choices[0].text != answers["tiny-other"].choices[0].text
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="smollm2-135m-instruct", prompt="w4", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_chat_completion_with_usage_and_layers(server, model_id):
    reply = server.client().chat.completions.create(model=model_id, messages=CHAT, max_tokens=8)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert reply.usage.completion_tokens == len(choice.layerdecode["layers"]) <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    ext = choice.layerdecode
    assert ext["strategy"] == "final" and ext["non_final_share"] == 0.0
    assert set(ext["layers"]) == {ext["num_layers"] - 1}


def test_completion_and_its_stream_agree(server, model_id):
    client = server.client()
    whole = client.completions.create(model=model_id, prompt="w5 w6", max_tokens=10)
    chunks = list(
        client.completions.create(
            model=model_id,
            prompt="w5 w6",
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    layers = [x for c in chunks if c.choices for x in c.choices[0].layerdecode["layers"]]
    assert layers == whole.choices[0].layerdecode["layers"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_stream_ends_with_done(server, model_id):
    conn, response = open_stream(
        server, {"model": model_id, "messages": CHAT, "max_tokens": 5}, "/v1/chat/completions"
    )
    events = read_events(response)
    conn.close()
    assert response.status == 200 and events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_strategy_and_params_per_request(server, model_id):
    client = server.client()
    reply = client.chat.completions.create(
        model=model_id,
        messages=CHAT,
        max_tokens=8,
        extra_body={"strategy": "fixed", "strategy_params": {"layer": 2}},
    )
    ext = reply.choices[0].layerdecode
    assert ext["strategy"] == "fixed" and ext["params"]["layer"] == 2
    assert set(ext["layers"]) == {2} and ext["non_final_share"] == 1.0
    preset = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=4, extra_body={"strategy": "confident-half"}
    )
    assert preset.choices[0].layerdecode["strategy"] == "confident-half"


def test_logprobs_of_chat_and_completion(server, model_id):
    client = server.client()
    chat = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob == pytest.approx(
            item.top_logprobs[0].logprob
        )
    done = client.completions.create(model=model_id, prompt="w1", max_tokens=4, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_stop_sequences(server, model_id):
    client = server.client()
    free = client.completions.create(model=model_id, prompt="w9 w3", max_tokens=12).choices[0]
    words = free.text.split()
    assert len(words) > 2, free.text
    stop = " " + words[2]
    stopped = client.completions.create(model=model_id, prompt="w9 w3", max_tokens=12, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free.text[: free.text.index(stop)]


# --- bad input: one JSON error each, and the server stays up -------------------------------

BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "x"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": CHAT, "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 65}, 400, "max_completion_tokens"),
    ({"messages": CHAT, "n": 17}, 400, "n"),
    ({"messages": CHAT, "temperature": -1}, 400, "temperature"),
    ({"messages": CHAT, "strategy": "nope"}, 400, "strategy"),
    ({"messages": CHAT, "strategy": "strategies/confident-half.yaml"}, 400, "strategy"),
    ({"messages": CHAT, "strategy": "/etc/passwd"}, 400, "strategy"),
    (
        {"messages": CHAT, "strategy": "confident", "strategy_params": {"windw": 3}},
        400,
        "strategy_params",
    ),
    (
        {"messages": CHAT, "strategy": "fixed", "strategy_params": {"layer": 99}},
        400,
        "strategy_params",
    ),
    ({"messages": CHAT, "model": "some/other-model"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_input_gets_a_json_error(server, body, status, param):
    got, data, _ = server.post("/v1/chat/completions", body)
    assert got == status, data
    error = data["error"]
    assert error["message"] and "Traceback" not in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_bad_input_through_the_client_and_server_lives_on(server, model_id):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model_id, messages=CHAT, extra_body={"strategy": "bogus"}
        )
    assert e.value.body["param"] == "strategy" and "Known:" in e.value.body["message"]
    big = {"messages": [{"role": "user", "content": "w1 " * 400_000}]}
    status, data, _ = server.post("/v1/chat/completions", big)
    assert status == 413 and "limit" in data["error"]["message"]
    status, data, _ = server.post("/v1/nowhere", {})
    assert status == 404 and "error" in data
    reply = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=3)
    assert reply.choices[0].message.content


# --- api key, queue, disconnects, shutdown, failures ------------------------------------------


def test_api_key_is_required_on_every_endpoint_but_health(tiny_model_dir):
    with Server(tiny_model_dir, env={"LAYERDECODE_API_KEY": "sesame"}) as s:
        assert s.get("/health")[0] == 200
        assert s.get("/v1/models")[0] == 401
        status, data, _ = s.post(
            "/v1/completions", {"prompt": "w1"}, {"Authorization": "Bearer nope"}
        )
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        client = s.client(api_key="sesame")
        model = client.models.list().data[0].id
        assert client.completions.create(model=model, prompt="w1", max_tokens=2).choices[0].text


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory):
    """The tiny llama with a context of 4096 tokens (a saved tiny model says 512)."""
    from layerdecode.testing import save_tiny_model

    path = tmp_path_factory.mktemp("long") / "tiny-llama"
    return save_tiny_model(path, max_position_embeddings=4096)


def test_full_queue_429_disconnect_frees_the_row_then_served_again(long_context_dir):
    long = {"prompt": "w1", "max_tokens": 2000}  # about 20 s on the tiny model, no EOS
    with Server(
        long_context_dir, "--max-batch", "1", "--max-queue", "1", "--max-tokens-limit", "2000"
    ) as s:
        conn, response = open_stream(s, long)  # takes the one batch slot
        assert len(read_events(response, 2)) == 2
        waiting = {}
        thread = threading.Thread(
            target=lambda: waiting.update(
                zip(
                    ("status", "data", "headers"),
                    s.post("/v1/completions", {"prompt": "w1", "max_tokens": 3}),
                    strict=True,
                )
            )
        )
        thread.start()  # waits in the queue
        deadline = time.monotonic() + 30
        while s.get("/health")[1]["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, data, headers = s.post("/v1/completions", {"prompt": "w1", "max_tokens": 3})
        assert status == 429 and data["error"]["type"] == "rate_limit_error"
        assert headers.get("retry-after") == "1"
        conn.close()  # the client goes away mid-stream: its row is freed at the next step
        closed = time.monotonic()
        thread.join(30)
        assert time.monotonic() - closed < 5  # not after the long request's 2000 tokens
        assert waiting["status"] == 200, waiting
        health = s.get("/health")[1]
        assert health["running"] == 0 and health["waiting"] == 0
        client = s.client()
        model = client.models.list().data[0].id
        assert client.completions.create(model=model, prompt="w1", max_tokens=2).choices[0].text
        # A non-streaming client that goes away is noticed too (within about a second).
        conn = s.connection()
        conn.request("POST", "/v1/completions", body=json.dumps(long))
        deadline = time.monotonic() + 30
        while s.get("/health")[1]["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        conn.close()
        closed = time.monotonic()
        while s.get("/health")[1]["running"] > 0 and time.monotonic() - closed < 10:
            time.sleep(0.1)
        assert time.monotonic() - closed < 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_requests_in_flight_and_exits_0(tiny_model_dir, sig):
    s = Server(tiny_model_dir, "--max-tokens-limit", "400")
    try:
        conn, response = open_stream(s, {"prompt": "w2 w4", "max_tokens": 300})
        first = read_events(response, 1)
        s.proc.send_signal(sig)
        rest = read_events(response)
        conn.close()
        assert first and rest[-1] == "[DONE]"
        assert rest[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        code = s.stop(sig)
    assert code == 0


def test_a_bad_default_strategy_is_a_usage_error(tiny_model_dir):
    from click.testing import CliRunner

    from layerdecode.cli import cli

    args = ["serve", "--model", str(tiny_model_dir), "--strategy", "nope"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Unknown strategy 'nope'" in result.output


class Boom(Exception):
    pass


def test_a_failing_generation_is_a_500_and_the_server_lives_on(tiny_model_dir, fresh_registry):
    import uvicorn

    from layerdecode import load, register_strategy
    from layerdecode.serve import ServerConfig, Worker, create_app
    from layerdecode.strategies.final import FinalStrategy

    @register_strategy("boom")
    class BoomStrategy(FinalStrategy):
        name = "boom"

        def select(self, view):
            raise Boom("the strategy broke")

    model, tokenizer = load(str(tiny_model_dir))
    app = create_app(Worker({"tiny": (model, tokenizer)}), ServerConfig())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="-", max_retries=0)
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="w1", extra_body={"strategy": "boom"})
        assert e.value.status_code == 500 and "the strategy broke" in e.value.body["message"]
        assert e.value.body["type"] == "server_error"
        reply = client.completions.create(model="tiny", prompt="w1", max_tokens=3)
        assert reply.choices[0].text
    finally:
        server.should_exit = True
        thread.join(30)
