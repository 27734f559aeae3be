"""What ``--trace`` costs ``layerdecode generate``: the decode time with it over without it.

    python benchmarks/bench_trace.py [--model NAME] [--tokens 256] [--repeats 5]
        [--strategies final,confident]

Each round runs the command's own generation (``layerdecode.cli.run.run_generate``, with
``--json`` so that nothing streams to the terminal) once without and once with a trace,
in turn, the order swapped every round so that drifts in machine load hit both alike;
both decode the same greedy tokens. Printed per strategy: the median times and their
ratio, the median of each round's ratio (which cancels drifts slower than a round), the
ratio of this process's CPU times, and the share of the traced time spent in the trace
writer itself. A trace costs the candidate entropies read from the device each step, a
row per token, and a Parquet part written every 4096 rows and on close.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = (
    "Write a detailed, step-by-step explanation of how a bicycle works, covering the "
    "frame, the wheels, the chain, the gears and the brakes."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default model)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--strategies", default="final,confident")
    args = parser.parse_args()

    # layerdecode first: on Linux it loads an installed system BLAS before mlx.core does.
    import layerdecode
    from layerdecode.blas import blas_status
    from layerdecode.cli.run import open_trace, run_generate
    from layerdecode.config import resolve_strategy
    from layerdecode.options import GenerationOptions
    from layerdecode.trace import read_trace

    print(f"blas: {blas_status()}")
    model, tokenizer = layerdecode.load(args.model, dtype=args.dtype)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    options = GenerationOptions(max_tokens=args.tokens)
    work = Path(tempfile.mkdtemp(prefix="bench-trace-"))
    runs = 0

    writing = [0.0]  # seconds spent in the trace writer, over every traced run

    def clocked(method):
        def call(*args, **kwargs):
            tic = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                writing[0] += time.perf_counter() - tic

        return call

    def timed(strategy, traced: bool) -> tuple[float, float, int]:
        nonlocal runs
        runs += 1
        trace = open_trace(str(work / f"run-{runs}.parquet"), tokenizer) if traced else None
        if trace is not None:
            trace.add_event = clocked(trace.add_event)
            trace.close = clocked(trace.close)
        out = io.StringIO()
        tic, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            run_generate(
                model, tokenizer, prompt, strategy, options,
                as_json=True, show_layers=False, model_name="bench", trace=trace,
            )  # fmt: skip
        seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
        import json

        tokens = len(json.loads(out.getvalue())["tokens"])
        if traced:
            assert read_trace(work / f"run-{runs}.parquet").num_rows == tokens
        return seconds, cpu, tokens

    print(f"{args.tokens} tokens at most, {args.repeats} rounds, trace files in {work}")
    print(
        f"{'strategy':<12} {'tokens':>6} {'plain s':>8} {'trace s':>8} {'ratio':>7} "
        f"{'paired':>7} {'cpu':>7} {'writer':>7}"
    )
    for name in args.strategies.split(","):
        strategy = resolve_strategy(name)
        timed(strategy, False)  # warm-ups: compiled kernels, caches, pyarrow's import
        timed(strategy, True)
        plain, traced, counts = [], [], set()
        cpu: dict[bool, list[float]] = {False: [], True: []}
        writing[0] = 0.0
        for round_ in range(args.repeats):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for with_trace in order:
                seconds, spent, tokens = timed(strategy, with_trace)
                (traced if with_trace else plain).append(seconds)
                cpu[with_trace].append(spent)
                counts.add(tokens)
        a, b = statistics.median(plain), statistics.median(traced)
        paired = statistics.median(t / p for t, p in zip(traced, plain, strict=True))
        count = "/".join(str(c) for c in sorted(counts))
        share = writing[0] / sum(traced)
        cpu_ratio = statistics.median(cpu[True]) / statistics.median(cpu[False])
        print(
            f"{name:<12} {count:>6} {a:>8.3f} {b:>8.3f} {b / a:>7.3f} {paired:>7.3f} "
            f"{cpu_ratio:>7.3f} {share:>7.2%}"
        )
    print("ratio: median traced wall time / median plain; paired: median of each round's")
    print("traced / plain; cpu: the same ratio in this process's CPU time (less blurred by")
    print("other processes); writer: share of the traced time spent adding rows and")
    print("writing parts (the rest of a trace's cost is the engine's read of the candidate")
    print("entropies)")


if __name__ == "__main__":
    main()
