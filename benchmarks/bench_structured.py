"""What a JSON Schema grammar costs per token, beside unconstrained decoding in the same run.

    python benchmarks/bench_structured.py [--model NAME] [--tokens 64] [--sizes 1,8]
        [--strategy final] [--repeats 3]

Two measurements:

* the grammar alone: a processor following a written answer token by token (no model):
  the time of its calls (llguidance's matcher and mask, the lazy MLX graph) and of
  evaluating the masked logits;
* the engine: for each batch size, rows with no processor and rows with a
  ``response_format`` processor each (a schema long enough that no row finishes), every row
  generating exactly ``--tokens`` tokens (end of sequence ignored), in turn; the best of
  ``--repeats`` interleaved rounds is shown, with the constrained/free ratio.
"""

from __future__ import annotations

import argparse
import json
import time

QUESTIONS = [
    "List some people with their names and ages as JSON.",
    "Write a JSON list of characters from a story, with names and ages.",
    "Give me a JSON object with a list of people.",
    "Describe a family as JSON: each person's name and age.",
    "Output JSON: a team of people with names and ages.",
    "Make up people for a novel, as JSON with names and ages.",
    "Return JSON with people in it, each with a name and an age.",
    "Write a JSON roster of people and their ages.",
]

# Far more items than --tokens can write: no row reaches the end of its answer.
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}
# The start of an answer (the schema wants more items) for the grammar alone.
ANSWER = json.dumps({"people": [{"name": f"Person number {i}", "age": 20 + i} for i in range(8)]})
ANSWER = ANSWER[: -len("]}")]


def grammar_alone(tokenizer, repeats: int) -> tuple[float, float, int]:
    """Microseconds per token, best of ``repeats``: the processor's call (matcher, mask and
    the lazy MLX graph) and the evaluation of that graph over the vocabulary."""
    import mlx.core as mx

    from layerdecode.structured import response_format_processor

    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    logits = mx.zeros((1, len(tokenizer._tokenizer)))
    histories = [mx.array([0, *ids[:n]], dtype=mx.int32) for n in range(len(ids) + 1)]
    mx.eval(histories)
    host = apply = float("inf")
    for _ in range(repeats):
        processor = response_format_processor(tokenizer, RESPONSE_FORMAT)
        outs = []
        tic = time.perf_counter()
        for history in histories:
            outs.append(processor(history, logits))
        host = min(host, (time.perf_counter() - tic) / len(histories))
        tic = time.perf_counter()
        for out in outs:
            mx.eval(out)
        apply = min(apply, (time.perf_counter() - tic) / len(histories))
        assert processor.error is None, processor.error
    return host * 1e6, apply * 1e6, len(ids)


def engine_run(model, tokenizer, prompts, strategy, tokens: int, constrained: bool) -> float:
    """Seconds per decoding step (prefill excluded) for these rows."""
    from layerdecode import Engine, GenerationOptions, Plan, resolve_strategy
    from layerdecode.structured import response_format_processor

    resolved = resolve_strategy(strategy)
    options = GenerationOptions.build(max_tokens=tokens)
    engine = Engine(model, tokenizer)
    for prompt in prompts:
        processors = (response_format_processor(tokenizer, RESPONSE_FORMAT),) if constrained else ()
        engine.add(prompt, Plan(resolved, options, logits_processors=processors, stop_tokens=()))
    first = engine.step()  # prefill and the first token
    assert first
    tic = time.perf_counter()
    steps = 0
    for _ in engine.run():
        steps += 1
    return (time.perf_counter() - tic) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sizes", default="1,8")
    parser.add_argument("--strategy", default="final")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import layerdecode
    from layerdecode.blas import blas_status

    print(f"blas: {blas_status()}")
    import llguidance

    from layerdecode.prompts import build_prompt

    model, tokenizer = layerdecode.load(args.model)
    print(f"llguidance {llguidance.__version__}, strategy {args.strategy}, {args.tokens} tokens")

    host, apply, count = grammar_alone(tokenizer, args.repeats)
    print(
        f"grammar alone ({count} tokens): {host:.1f} us/token in the processor (matcher + mask), "
        f"{apply:.1f} us/token to apply the mask (MLX)"
    )

    for size in [int(s) for s in args.sizes.split(",")]:
        prompts = [build_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(size)]
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for constrained in (False, True):
                step = engine_run(
                    model, tokenizer, prompts, args.strategy, args.tokens, constrained
                )
                best[constrained] = min(best[constrained], step)
        free, bound = best[False] * 1e3, best[True] * 1e3
        print(
            f"{size} row(s): free {free:.2f} ms/step ({size / best[False]:.0f} tok/s), "
            f"json_schema {bound:.2f} ms/step ({size / best[True]:.0f} tok/s); "
            f"ratio {bound / free:.2f}x, +{(bound - free) / size * 1e3:.0f} us/token"
        )


if __name__ == "__main__":
    main()
