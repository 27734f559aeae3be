"""``layerdecode serve`` beside ``mlx_lm.server``: aggregate streaming tokens/s, and the time to
first token of a chat whose turns reuse the prompt cache.

    python benchmarks/bench_serve.py [--model NAME] [--clients 1,4,8,16] [--tokens 48]
    python benchmarks/bench_serve.py --turns 6 [--repeats 3]

*Throughput* (the default): each server is started on a free 127.0.0.1 port with the same
model; for each number of concurrent clients, that many ``openai`` clients stream chat
completions of the same prompts at once (greedy, ``max_tokens`` each). Aggregate tokens/s is
all completion tokens over the wall time from the first request to the last token. All
servers run at once (idle while another is timed) and are timed in turn, ``--repeats`` rounds
with the order reversed every other round; each row prints the median of its rounds, and
``final vs mlx_lm.server`` the median of the ratios of the same round.

*Prompt cache* (``--turns N``): an N-turn chat (a system prompt of about 400 tokens, user
messages of about 50, greedy, ``--tokens`` per answer) is held with three servers at once:
layerdecode with its prompt cache (``--prompt-cache-size`` 10, the default), layerdecode
with ``--prompt-cache-size 0``, and mlx_lm.server (its prompt cache on, as by default). Each
server carries its own history (its own answers); turn by turn the three are asked in turn.
TTFT is the time from sending a streaming request to the first chunk whose delta carries
text (the first chunk of any kind is printed beside it). The answers with and without the
cache must be the same, turn by turn; ``cached`` is ``usage.prompt_tokens_details``'s
``cached_tokens`` of the cached layerdecode (asked through ``stream_options``). Every round
starts a new conversation (the system prompt names the round, so no cache carries over).

On Linux all servers multiply with the same BLAS: layerdecode loads the system's by itself,
and mlx_lm.server gets the same library through ``LD_PRELOAD``; the script prints which.
layerdecode runs ``final`` and ``confident`` (chosen per request); mlx-lm serves the same
weights from the mlx-lm folder the model was converted to. The load average is printed before
and after, as other processes on the machine skew every number.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

SYSTEM = (
    "You are the help desk of the Willow Lane Community Garden, a cooperative of about two "
    "hundred members who share forty raised beds, a greenhouse, a tool shed and a small "
    "orchard on the edge of town. Answer members' questions briefly, kindly and concretely. "
    "Here is what you know about the garden. The gates open at seven in the morning and close "
    "at nine in the evening from April to October, and at five in the afternoon in winter. "
    "Each member may rent one bed for a season; the fee is forty dollars, and members who "
    "volunteer six hours a season pay half. Beds left untended for three weeks are offered to "
    "the waiting list after a written reminder. Water comes from two rain tanks and a mains "
    "tap; hoses must be coiled after use, and sprinklers are not allowed between noon and four "
    "in the afternoon in July and August. Compost bins are by the north fence: green waste "
    "goes in the left bin, woody stems in the middle one, and finished compost is taken from "
    "the right one. No meat, dairy or diseased plants go in the compost. The tool shed code "
    "changes on the first day of each month and is posted in the members' newsletter; tools "
    "are cleaned and returned the same day. The greenhouse is shared: each member has one "
    "shelf, seedlings are labelled with the member's name and the sowing date, and the vents "
    "are opened when the thermometer passes twenty-five degrees. Pesticides are not allowed; "
    "members may use netting, copper tape, beer traps and companion planting. The orchard "
    "has apples, pears, two plum trees and a fig; its fruit is picked on shared harvest days "
    "announced a week ahead. Children are welcome with an adult. Dogs stay on a lead and "
    "outside the beds. Bees are kept by the east wall by two trained members; nobody else "
    "opens the hives. Problems with neighbours are taken to the garden committee, which meets "
    "on the second Tuesday of each month in the greenhouse. When you are not sure of an "
    "answer, say so and suggest asking the committee by email."
)

TURNS = [
    "Hello! I joined the garden last week and I was given bed number twelve, which is near the "
    "orchard. The soil looks dry and there are a lot of weeds. What should I do first, and is "
    "there anything I must know about watering before I start this weekend?",
    "Thanks. I would also like to start some tomatoes and peppers from seed. My flat is small "
    "and dark, so I was hoping to use the greenhouse. How does that work, and how should I "
    "label my trays so that nobody moves them by mistake?",
    "Something is eating the young lettuce in my bed at night, and I found slime trails on "
    "the boards this morning. I do not want to use anything harmful to the bees. Which of the "
    "allowed methods would you try first, and why would it help?",
    "I have a big pile of weeds, some old bread, a few tomato leaves with brown spots and "
    "some prunings from the raspberry canes. Where does each of these go, and is there "
    "anything in that pile that I should take home instead?",
    "My neighbour in bed eleven leaves the hose running across the path almost every day, "
    "and yesterday my daughter tripped over it. I do not want to start a fight. What would "
    "be a friendly way to deal with this, and who can help if it goes on?",
    "One last question: I will be away for four weeks in August. Could my bed be given to "
    "someone else while I am gone, and what can I arrange so that my plants survive the heat "
    "without breaking the watering rules?",
]


@dataclass
class Server:
    """A started server: its label, port, the model name requests use, and its process."""

    label: str
    port: int
    model: str
    proc: subprocess.Popen
    log: Path
    history: list[dict] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


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
    label: str,
    cmd: list[str],
    port: int,
    model: str,
    root: str | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    env = dict(env or os.environ)
    if root is not None:  # that checkout's layerdecode first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    log = Path(tempfile.mkstemp(prefix="bench_serve-", suffix=".log")[1])
    with log.open("w") as err:  # a file, not a pipe nobody reads: the server never blocks
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {' '.join(cmd)}\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return Server(label, port, model, proc, log)
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"server did not start: {' '.join(cmd)}")


def stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    server.log.unlink(missing_ok=True)


def layerdecode_server(args, label: str, root: str | None = None, *flags: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "layerdecode.cli", "serve", "--model", args.model]
    cmd += ["--port", str(port), *flags]
    return start(label, cmd, port, args.model, root)


def mlx_server(args) -> Server:
    """mlx_lm.server with the BLAS layerdecode uses; prints which each server multiplies with."""
    port = free_port()
    blas_env, blas = same_blas_env()
    preload = blas_env.get("LD_PRELOAD", "none")
    print(f"layerdecode serve: {blas}\nmlx_lm.server: LD_PRELOAD={preload}", flush=True)
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", args.mlx_model]
    cmd += ["--port", str(port), "--log-level", "WARNING"]
    return start("mlx_lm.server", cmd, port, args.mlx_model, env=blas_env)


def client(server: Server):
    from openai import OpenAI

    base = f"http://127.0.0.1:{server.port}/v1"
    return OpenAI(base_url=base, api_key="-", max_retries=0, timeout=600)


def measure(
    server: Server,
    clients: int,
    tokens: int,
    extra: dict | list[dict],
    temps: list[float] = (0.0,),
) -> float:
    """Aggregate tokens/s of ``clients`` streams; client i sends ``extra[i % len(extra)]``
    and ``temps[i % len(temps)]``."""
    api = client(server)
    extras = extra if isinstance(extra, list) else [extra]

    def one(i: int) -> int:
        stream = api.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=tokens,
            temperature=temps[i % len(temps)],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=dict(extras[i % len(extras)]),
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


@dataclass
class Turn:
    """One streamed answer: seconds to the first chunk with text and to the first chunk at
    all, the whole request's seconds, the answer, and the usage's prompt and cached tokens."""

    ttft: float
    first_chunk: float
    total: float
    text: str
    prompt_tokens: int
    cached: int | None


def ask(server: Server, messages: list[dict], tokens: int) -> Turn:
    api = client(server)
    tic = time.perf_counter()
    stream = api.chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = ttft = None
    parts: list[str] = []
    prompt_tokens, cached = 0, None
    for chunk in stream:
        now = time.perf_counter() - tic
        first = now if first is None else first
        for choice in chunk.choices:
            if choice.delta.content:
                ttft = now if ttft is None else ttft
                parts.append(choice.delta.content)
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            cached = details.cached_tokens if details is not None else None
    total = time.perf_counter() - tic
    return Turn(ttft or total, first or total, total, "".join(parts), prompt_tokens, cached)


def conversation(servers: list[Server], rnd: int, turns: int, tokens: int) -> list[list[Turn]]:
    """One chat of ``turns`` turns with every server, asked in turn; ``[turn][server]``."""
    system = f"Conversation {rnd + 1}. {SYSTEM}"
    for server in servers:
        server.history = [{"role": "system", "content": system}]
    rows = []
    for t in range(turns):
        order = servers if (rnd + t) % 2 == 0 else servers[::-1]
        answers = {}
        for server in order:
            server.history.append({"role": "user", "content": TURNS[t % len(TURNS)]})
            answers[server.label] = turn = ask(server, server.history, tokens)
            server.history.append({"role": "assistant", "content": turn.text})
        row = [answers[server.label] for server in servers]
        rows.append(row)
    return rows


def prompt_cache_bench(args) -> None:
    print(load(), flush=True)
    servers = [layerdecode_server(args, "layerdecode (cache)")]
    servers.append(
        layerdecode_server(args, "layerdecode (no cache)", None, "--prompt-cache-size", "0")
    )
    if not args.no_mlx:
        servers.append(mlx_server(args))
    try:
        for server in servers:  # warm-up, sharing no prefix with the chats
            ask(server, [{"role": "user", "content": QUESTIONS[0]}], 8)
        rounds = [conversation(servers, r, args.turns, args.tokens) for r in range(args.repeats)]
    finally:
        for server in servers:
            stop(server)
    print(load())
    print(
        f"model {args.model}, {args.turns} turns, greedy, max_tokens {args.tokens}, "
        f"{args.repeats} rounds; TTFT: request sent -> first chunk with text, ms "
        "(first chunk of any kind in brackets); median of the rounds"
    )
    labels = [server.label for server in servers]
    head = f"{'turn':>4}{'prompt':>8}{'cached (rounds)':>16}" + "".join(
        f"{name:>26}" for name in labels
    )
    mlx = "mlx_lm.server" in labels
    print(head + (f"{'cache/mlx':>11}{'mlx cached':>16}" if mlx else ""))
    for t in range(args.turns):
        turns = [rows[t] for rows in rounds]
        cached = "/".join(str(row[0].cached) for row in turns)
        line = f"{t + 1:>4}{turns[0][0].prompt_tokens:>8}{cached:>16}"
        ttfts = []
        for s in range(len(servers)):
            ttft = statistics.median(row[s].ttft for row in turns) * 1e3
            first = statistics.median(row[s].first_chunk for row in turns) * 1e3
            ttfts.append(ttft)
            line += f"{f'{ttft:.0f} ({first:.0f})':>26}"
        if mlx:
            ratio = statistics.median(row[0].ttft / row[-1].ttft for row in turns)
            line += f"{ratio:>10.2f}x"
            line += f"{'/'.join(str(row[-1].cached) for row in turns):>16}"
        print(line)
    if mlx:
        last = [rows[-1] for rows in rounds]
        ratios = ", ".join(f"{row[0].ttft / row[-1].ttft:.2f}x" for row in last)
        print(f"turn {args.turns} TTFT layerdecode (cache) / mlx_lm.server: {ratios} (rounds)")
    same = True
    for r, rows in enumerate(rounds):
        for t, row in enumerate(rows):
            if row[0].text != row[1].text:
                same = False
                print(
                    f"round {r + 1} turn {t + 1}: the answers with and without the cache "
                    f"differ:\n  cache:    {row[0].text!r}\n  no cache: {row[1].text!r}"
                )
            if mlx and row[0].text != row[-1].text:
                print(
                    f"round {r + 1} turn {t + 1}: mlx_lm.server answered otherwise "
                    f"(not an error): {row[-1].text!r}"
                )
    print(f"answers with and without the cache identical turn by turn: {same}")
    for t, row in enumerate(rounds[0]):
        print(f"turn {t + 1} answer: {row[0].text!r}")


def throughput_bench(args) -> None:
    clients = [int(c) for c in args.clients.split(",")]
    print(load(), flush=True)
    targets: list[tuple[str, Server, list[dict], list[float]]] = []
    servers: list[Server] = []
    try:
        for root in [None, *args.root]:
            label = "layerdecode" if root is None else f"layerdecode ({root})"
            server = layerdecode_server(args, label, root, "--max-batch", str(max(clients)))
            servers.append(server)
            for strategy in args.strategies.split(","):
                targets.append((f"{label} {strategy}", server, [{"strategy": strategy}], [0.0]))
            for spec in args.mix:
                names, _, temps = spec.partition("@")
                extra = [{"strategy": name} for name in names.split(",")]
                temps = [float(t) for t in temps.split(",")] if temps else [0.0]
                targets.append((f"{label} {spec}", server, extra, temps))
        if not args.no_mlx:
            servers.append(server := mlx_server(args))
            targets.append(("mlx_lm.server", server, [{}], [0.0]))
        for _, server, extra, temps in targets:  # warm-up at each batch size
            for n in clients:
                measure(server, n, 8, extra, temps)
        runs: dict[str, dict[int, list[float]]] = {
            name: {n: [] for n in clients} for name, *_ in targets
        }
        for rnd in range(args.repeats):
            for n in clients:
                for name, server, extra, temps in targets[:: 1 if rnd % 2 == 0 else -1]:
                    runs[name][n].append(measure(server, n, args.tokens, extra, temps))
    finally:
        for server in servers:
            stop(server)
    print(load())
    print(
        f"model {args.model}, {args.tokens} tokens per request, {args.repeats} rounds "
        "(median tokens/s)"
    )
    width = max(24, *(len(name) + 2 for name in runs))
    print(
        f"{'server':<{width}}"
        + "".join(f"{f'{n} clients':>12}" for n in clients)
        + f"{'8 vs 1':>9}"
    )
    for name, speeds in runs.items():
        median = {n: statistics.median(v) for n, v in speeds.items()}
        scale = f"{median[8] / median[1]:.2f}x" if 8 in median and 1 in median else ""
        print(f"{name:<{width}}" + "".join(f"{median[n]:>12.1f}" for n in clients) + f"{scale:>9}")
    if "mlx_lm.server" in runs and "layerdecode final" in runs:
        mlx, final = runs["mlx_lm.server"], runs["layerdecode final"]
        for n in clients:
            ratios = [f / m for f, m in zip(final[n], mlx[n], strict=True)]
            each = ", ".join(f"{r:.2f}" for r in ratios)
            print(
                f"final vs mlx_lm.server, {n} clients: {statistics.median(ratios):.2f}x "
                f"(rounds: {each})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mlx-model", help="mlx-lm folder for mlx_lm.server [default: cached]")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens of each request")
    parser.add_argument("--strategies", default="final,confident")
    parser.add_argument("--repeats", type=int, default=1, help="rounds, alternating the order")
    parser.add_argument("--no-mlx", action="store_true", help="skip mlx_lm.server")
    parser.add_argument(
        "--turns",
        type=int,
        default=0,
        help="time the first token of each turn of a chat of this many turns (prompt cache) "
        "instead of the throughput",
    )
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
    if args.repeats < 1 or args.turns < 0:
        sys.exit("--repeats must be at least 1 and --turns at least 0")
    if args.mlx_model is None and not args.no_mlx:
        from layerdecode.manifests import cache_dir

        folders = sorted((cache_dir() / "models" / args.model).glob("*/config.json"))
        if not folders:
            sys.exit(f"no mlx-lm folder for {args.model}: pass --mlx-model PATH or --no-mlx")
        args.mlx_model = str(folders[0].parent)
    if args.turns:
        prompt_cache_bench(args)
    else:
        throughput_bench(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
