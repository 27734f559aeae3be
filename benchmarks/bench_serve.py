"""Aggregate streaming tokens/s of ``layerdecode serve`` beside ``mlx_lm.server``.

    python benchmarks/bench_serve.py [--model NAME] [--clients 1,4,8,16] [--tokens 48]

Starts each server in turn on a free 127.0.0.1 port with the same model, then, for each
number of concurrent clients, has that many ``openai`` clients stream chat completions of
the same prompts at once (greedy, ``max_tokens`` each). Aggregate tokens/s is all completion
tokens over the wall time from the first request to the last token. On Linux both servers
multiply with the same BLAS: layerdecode loads the system's by itself, and mlx_lm.server gets
the same library through ``LD_PRELOAD``; the script prints which. layerdecode runs
``final`` and ``confident`` (chosen per request); mlx-lm serves the same weights from the
mlx-lm folder the model was converted to.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle step by step.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue? Explain for a child.",
    "List the planets of the solar system and one fact about each.",
    "How do vaccines train the immune system?",
    "What are the main causes of the seasons on Earth?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_blas_env() -> tuple[dict[str, str], str]:
    """An environment in which a plain MLX process multiplies with the BLAS layerdecode loads
    here (mlx_lm.server does not import layerdecode, so it is preloaded), and a line saying
    which library that is."""
    import layerdecode  # noqa: F401  (loads the system BLAS, as the layerdecode server does)
    from layerdecode.blas import blas_status, loaded_blas

    env = dict(os.environ)
    path = loaded_blas()
    if path is not None and "blas" not in env.get("LD_PRELOAD", "").lower():
        env["LD_PRELOAD"] = os.pathsep.join(filter(None, [path, env.get("LD_PRELOAD")]))
    return env, blas_status()


def start(
    cmd: list[str], port: int, root: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    env = dict(env or os.environ)
    if root is not None:  # that checkout's layerdecode first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {' '.join(cmd)}\n{proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"server did not start: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(
    port: int,
    model: str,
    clients: int,
    tokens: int,
    extra: dict | list[dict],
    temps: list[float] = (0.0,),
) -> float:
    """Aggregate tokens/s of ``clients`` streams; client i sends ``extra[i % len(extra)]``
    and ``temps[i % len(temps)]``."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)
    extras = extra if isinstance(extra, list) else [extra]

    def one(i: int) -> int:
        temp = temps[i % len(temps)]
        body = dict(extras[i % len(extras)])
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=tokens,
            temperature=temp,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=body,
        )
        count = chunks = 0
        for chunk in stream:
            chunks += bool(chunk.choices)
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        return count or chunks

    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        generated = sum(pool.map(one, range(clients)))
    return generated / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mlx-model", help="mlx-lm folder for mlx_lm.server [default: cached]")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--strategies", default="final,confident")
    parser.add_argument("--no-mlx", action="store_true", help="skip mlx_lm.server")
    parser.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="STRATEGIES[@TEMPS]",
        help="also time rows that mix strategies (cycled over the clients) and temperatures, "
        "e.g. final,confident,dola,sled or final@0,0.7 (repeatable)",
    )
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        help="also time the layerdecode server of another checkout (e.g. a git worktree of an "
        "older commit), with this environment's packages (repeatable)",
    )
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    strategies = args.strategies.split(",")
    mlx_model = args.mlx_model
    if mlx_model is None and not args.no_mlx:
        from layerdecode.manifests import cache_dir

        folders = sorted((cache_dir() / "models" / args.model).glob("*/config.json"))
        if not folders:
            sys.exit(f"no mlx-lm folder for {args.model}: pass --mlx-model PATH or --no-mlx")
        mlx_model = str(folders[0].parent)

    rows: dict[str, dict[int, float]] = {}
    mixes = []
    for spec in args.mix:
        names, _, temps = spec.partition("@")
        extra = [{"strategy": name} for name in names.split(",")]
        mixes.append((spec, extra, [float(t) for t in temps.split(",")] if temps else [0.0]))
    for root in [None, *args.root]:
        label = "layerdecode" if root is None else f"layerdecode ({root})"
        port = free_port()
        cmd = [sys.executable, "-m", "layerdecode.cli", "serve", "--model", args.model]
        cmd += ["--port", str(port), "--max-batch", str(max(clients))]
        proc = start(cmd, port, root)
        try:
            for strategy in strategies:
                measure(port, args.model, 2, 8, {"strategy": strategy})  # warm-up
                rows[f"{label} {strategy}"] = {
                    n: measure(port, args.model, n, args.tokens, {"strategy": strategy})
                    for n in clients
                }
            for spec, extra, temps in mixes:
                rows[f"{label} {spec}"] = {
                    n: measure(port, args.model, n, args.tokens, extra, temps) for n in clients
                }
        finally:
            stop(proc)
    if not args.no_mlx:
        port = free_port()
        blas_env, blas = same_blas_env()
        preload = blas_env.get("LD_PRELOAD", "none")
        print(f"layerdecode serve: {blas}\nmlx_lm.server: LD_PRELOAD={preload}", flush=True)
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", mlx_model]
        cmd += ["--port", str(port), "--log-level", "WARNING"]
        proc = start(cmd, port, env=blas_env)
        try:
            measure(port, mlx_model, 2, 8, {})
            rows["mlx_lm.server"] = {
                n: measure(port, mlx_model, n, args.tokens, {}) for n in clients
            }
        finally:
            stop(proc)

    print(f"model {args.model}, {args.tokens} tokens per request, {os.cpu_count()} CPUs")
    width = max(24, *(len(name) + 2 for name in rows))
    print(
        f"{'server':<{width}}"
        + "".join(f"{f'{n} clients':>12}" for n in clients)
        + f"{'8 vs 1':>9}"
    )
    for name, speeds in rows.items():
        scale = f"{speeds[8] / speeds[1]:.2f}x" if 8 in speeds and 1 in speeds else ""
        print(f"{name:<{width}}" + "".join(f"{speeds[n]:>12.1f}" for n in clients) + f"{scale:>9}")
    if "mlx_lm.server" in rows and "layerdecode final" in rows:
        mlx, final = rows["mlx_lm.server"], rows["layerdecode final"]
        ratios = "  ".join(f"{n}: {final[n] / mlx[n]:.2f}x" for n in clients)
        print(f"final vs mlx_lm.server: {ratios}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
