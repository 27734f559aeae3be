"""How long requests wait behind a long prompt's prefill on ``layerdecode serve``.

    python benchmarks/bench_prefill_wait.py [--url URL | --root CHECKOUT] [--prompt-tokens 4000]

Two measures, each repeated ``--runs`` times (the median is printed last):

- *short wait*: a streaming completion with a prompt of about ``--prompt-tokens`` tokens is
  sent, then ``--delay`` seconds later a short streaming request (``--short-tokens`` tokens);
  the time from sending the short request to its first token.
- *stream gap*: a stream already running when the long prompt comes; the largest gap
  between two of its chunks until the long request's first token.

The script starts its own server (the default model, on a free 127.0.0.1 port; ``--root``
serves another checkout's layerdecode, e.g. an older commit unpacked with ``git archive``,
with this environment's packages) or uses the one at ``--url``. The long prompt's length is
calibrated once on the server (that request also warms it up); each request's prompt begins
with a line of its own, so that no prompt cache serves it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid

LINE = "Line {i}: the quick brown fox jumps over the lazy dog near the old river bank.\n"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy, the model goes on counting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "layerdecode.cli", "serve", "--model", args.model]
    cmd += ["--port", str(port), "--max-tokens-limit", "4096"]
    if args.prefill_step_size:
        cmd += ["--prefill-step-size", str(args.prefill_step_size)]
    env = dict(os.environ)
    if args.root:  # that checkout's layerdecode first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        cmd, cwd=args.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {' '.join(cmd)}\n{proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start in time")


class Stream:
    """A streaming completion: the times its chunks came, from when it was sent."""

    def __init__(self, url: str, prompt: str, max_tokens: int) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}
        self.sent = time.monotonic()
        self.conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        self.response = self.conn.getresponse()
        if self.response.status != 200:
            sys.exit(f"the server answered {self.response.status}: {self.response.read()[:300]}")
        self.arrivals: list[float] = []
        self.usage: dict | None = None

    def next_chunk(self) -> bool:
        """Read the next chunk; False at the end of the stream."""
        while line := self.response.readline():
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                return False
            self.arrivals.append(time.monotonic())
            return True
        return False

    def first(self) -> float:
        self.next_chunk()
        return self.arrivals[0] - self.sent

    def close(self) -> None:
        self.conn.close()


def calibrate(url: str, target: int) -> tuple[str, int]:
    """A prompt of about ``target`` tokens on the served model, and its length."""
    probe = "".join(LINE.format(i=i) for i in range(200))
    tokens = completion_tokens(url, unique(probe))
    lines = max(1, round(200 * target / tokens))
    prompt = "".join(LINE.format(i=i) for i in range(lines))
    return prompt, completion_tokens(url, unique(prompt))  # also warms the server up


def unique(prompt: str) -> str:
    """``prompt`` after a first line no other request has: no cached prefix to reuse."""
    return f"Request {uuid.uuid4().hex}.\n{prompt}"


def completion_tokens(url: str, prompt: str) -> int:
    request = urllib.request.Request(
        f"{url}/v1/completions",
        json.dumps({"prompt": prompt, "max_tokens": 1}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["usage"]["prompt_tokens"]


def short_wait(url: str, prompt: str, delay: float, short_tokens: int) -> tuple[float, float]:
    """(the long request's first token, the short one's), in seconds from each one's send."""
    long_first: list[float] = []
    thread = threading.Thread(target=lambda: long_first.append(run_first(url, unique(prompt), 1)))
    thread.start()
    time.sleep(delay)
    short = run_first(url, unique("Say something short."), short_tokens)
    thread.join()
    return long_first[0], short


def run_first(url: str, prompt: str, max_tokens: int) -> float:
    stream = Stream(url, prompt, max_tokens)
    try:
        first = stream.first()
        while stream.next_chunk():
            pass
        return first
    finally:
        stream.close()


def stream_gap(url: str, prompt: str) -> tuple[float, float]:
    """(the largest gap of a running stream while the long prompt is prefilled, the long
    request's first token)."""
    running = Stream(url, unique(COUNTING), 4000)
    try:
        for _ in range(3):
            running.next_chunk()
        long_first: list[float] = []
        long = unique(prompt)
        thread = threading.Thread(target=lambda: long_first.append(run_first(url, long, 1)))
        since = len(running.arrivals) - 1
        thread.start()
        while thread.is_alive():
            if not running.next_chunk():
                sys.exit("the running stream ended before the long prompt's first token")
        thread.join()
    finally:
        running.close()
    times = running.arrivals[since:]
    return max(b - a for a, b in zip(times, times[1:], strict=False)), long_first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--root", help="serve this checkout's layerdecode")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--prefill-step-size", type=int, help="passed to the server started")
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    proc = None
    url = args.url
    if url is None:
        proc, url = start(args)
    try:
        prompt, tokens = calibrate(url, args.prompt_tokens)
        waits, gaps = [], []
        for run in range(args.runs):
            long_first, short_first = short_wait(url, prompt, args.delay, args.short_tokens)
            gap, gap_long = stream_gap(url, prompt)
            waits.append(short_first)
            gaps.append(gap)
            print(
                f"run {run + 1}: long prompt's first token {long_first:.2f} s, short request's "
                f"first token {short_first:.2f} s; running stream's largest gap {gap:.2f} s "
                f"(long prompt's first token {gap_long:.2f} s)",
                flush=True,
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    server = args.url or f"layerdecode serve --model {args.model}" + (
        f" --prefill-step-size {args.prefill_step_size}" if args.prefill_step_size else ""
    )
    print(
        f"setting: {server}{f' from {args.root}' if args.root else ''}; long prompt "
        f"{tokens} tokens; short request ({args.short_tokens} tokens) sent {args.delay} s "
        f"after it; {os.cpu_count()} CPUs"
    )
    print(
        f"median of {args.runs}: short request's first token {statistics.median(waits):.2f} s; "
        f"running stream's largest gap {statistics.median(gaps):.2f} s"
    )


if __name__ == "__main__":
    main()
