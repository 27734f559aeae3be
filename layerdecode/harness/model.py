"""The lm-evaluation-harness model ``layerdecode``: every strategy on every lm-eval task.

``generate_until`` runs layerdecode's batched decoding with the task's ``until`` strings as
stop sequences, so a row ends inside the loop at the first one. ``loglikelihood`` and
``loglikelihood_rolling`` score each position with the distribution the strategy decodes
from there (see :mod:`layerdecode.harness.scoring`).

With ``strategy=final`` the requests are tokenised, truncated, batched and scored as
``mlx_lm.evaluate`` does (``MLXLM``), so both give the same results on the same model.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from mlx_lm.models.cache import make_prompt_cache

from .args import DEFAULT_MAX_TOKENS, HarnessArgs, parse_model_args
from .ranks import join, shared
from .scoring import PositionScorer

# A child of lm-eval's logger, so its level and handlers (LMEVAL_LOG_LEVEL) apply.
logger = logging.getLogger("lm_eval.models.layerdecode")

STEP_SIZE = 2048  # tokens per forward pass, as mlx-lm's prefill
# lm-eval generation kwargs -> GenerationOptions fields.
_GEN_KWARGS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}
_SKIPPED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample"}


def _figures(details: Sequence[dict[str, Any]]) -> Any:
    """The per-token figures of every request's output, added up."""
    from layerdecode.layerstats import TokenTally, token_stats

    tally = TokenTally()
    for d in details:
        if not d:
            continue
        one = token_stats(d["layers"], d["final_layer"], d["changed"], d["head_rows"])
        depths = [d["final_layer"] - layer for layer in d["layers"]]
        tally.add(depths, one.changed, sum(d["head_rows"]))
    return tally.stats()


def _shown(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def _cut_at_first(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``stops``."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


@register_model("layerdecode")
class LayerdecodeLM(LM):
    """lm-eval's ``LM`` over a layerdecode model and strategy.

    ``model_args`` (all optional): ``model``, ``strategy``, the strategy's params (lists
    as ``16:18:20``), ``dtype``, ``batch_size``, ``max_tokens``, ``add_special_tokens``,
    ``masked_logprob``, ``score_chunk``; see ``docs/lm-eval.md``.

    Started by ``mlx.launch``, every rank computes its share of the requests and returns
    all the results (:mod:`layerdecode.harness.ranks`); ``group`` is this rank's place.
    """

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        from layerdecode.config import resolve_strategy
        from layerdecode.loading import load

        self.args: HarnessArgs = parse_model_args(model_args)
        self.group = join()
        self.resolved = resolve_strategy(self.args.strategy, self.args.params)
        self._model, self.tokenizer = load(self.args.model, dtype=self.args.dtype)
        if self.args.add_special_tokens is None:
            self.add_special_tokens = self.tokenizer.chat_template is None
        else:
            self.add_special_tokens = self.args.add_special_tokens
        self.scorer = PositionScorer(
            self._model,
            self.resolved.strategy,
            chunk=self.args.score_chunk,
            masked_logprob=self.args.masked_logprob,
        )
        self.generation_counts: list[int] = []
        self.generation_details: list[dict[str, Any]] = []
        self.generation_stats: dict[str, float | None] = {}

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> LayerdecodeLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> LayerdecodeLM:
        # lm-eval adds its own --batch_size (default 1) here: a model_args value wins.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # -- chat templates ---------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # -- scoring ----------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens))

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` per request, under the strategy."""
        groups: dict[str, list[tuple[int, str]]] = {}
        for index, request in enumerate(requests):
            context, continuation = request.args
            groups.setdefault(context, []).append((index, continuation))
        items = list(groups.items())
        size = self.args.batch_size
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        done = shared(self.group, requests, chunks, self._score_contexts, "loglikelihood")
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for chunk, scored in zip(chunks, done, strict=True):
            indices = [index for _, members in chunk for index, _ in members]
            for index, (score, greedy) in zip(indices, scored, strict=True):
                results[index] = (score, greedy)
        return results

    def _score_contexts(
        self, chunk: list[tuple[str, list[tuple[int, str]]]]
    ) -> list[tuple[float, bool]]:
        """Scores of every continuation of each context in ``chunk``, in order."""
        out: list[tuple[float, bool]] = []
        limit = self.args.max_tokens or DEFAULT_MAX_TOKENS
        for context, members in chunk:
            prefix = self._encode(context)
            sequences = [self._encode(context + continuation) for _, continuation in members]
            # Keep the longest sequence within ``limit`` tokens by dropping the oldest context.
            cut = max(0, max(map(len, sequences)) - limit - 1)
            kept = max(len(prefix) - cut, 0)
            if kept == 0:
                out.extend([(-float("inf"), False)] * len(members))
                continue
            start = len(prefix)
            first, cache = self._prefix(prefix[len(prefix) - kept :])
            out.extend(self._continuation(first, cache, s[start:]) for s in sequences)
        return out

    def _prefix(self, prefix: list[int]) -> tuple[mx.array, list[Any]]:
        """Run the context; return the log-probabilities after it and its cache."""
        tokens = mx.array(prefix)[None]
        cache = make_prompt_cache(self._model)
        passed = None
        for i in range(0, tokens.shape[1], STEP_SIZE):
            passed = self.scorer.forward(tokens[:, i : i + STEP_SIZE], cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
        last = passed.logits.shape[1] - 1
        view = self.scorer.view(passed, mx.array([0]), mx.array([last]))
        logprobs = self.scorer.logprobs(view)[0]
        mx.eval(logprobs)
        return logprobs, cache

    def _continuation(
        self, first: mx.array, cache: list[Any], tokens: list[int]
    ) -> tuple[float, bool]:
        if not tokens:
            return 0.0, True
        head, best = self.scorer.pick(first[None], mx.array(tokens[:1]))
        score, greedy = head.item(), best.item()
        if len(tokens) > 1:
            cache = copy.deepcopy(cache)
            inputs, targets = tokens[:-1], tokens[1:]
            parts, flags = [], []
            for i in range(0, len(inputs), STEP_SIZE):
                window = inputs[i : i + STEP_SIZE]
                passed = self.scorer.forward(mx.array(window)[None], cache)
                positions = list(range(len(window)))
                scores = self.scorer.score(
                    passed, [0] * len(window), positions, targets[i : i + STEP_SIZE]
                )
                parts.append(scores.logprobs)
                flags.append(scores.greedy)
            score += mx.sum(mx.concatenate(parts)).item()
            greedy = greedy and mx.all(mx.concatenate(flags)).item()
        # Scores pass through float32 on their way out, as mlx_lm.evaluate's do.
        return float(np.float32(score)), bool(greedy)

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Log-likelihood of each whole text (every token after the first), under the strategy."""
        encoded = [self._encode(request.args[0]) for request in requests]
        size = self.args.batch_size
        chunks = [encoded[start : start + size] for start in range(0, len(encoded), size)]
        done = shared(self.group, requests, chunks, self._rolling_batch, "loglikelihood_rolling")
        return [score for scores in done for score in scores]

    def _rolling_batch(self, batch: list[list[int]]) -> list[float]:
        lengths = [len(s) for s in batch]
        width = max(lengths)
        padded = np.zeros((len(batch), width), dtype=np.int64)
        for row, sequence in enumerate(batch):
            padded[row, : len(sequence)] = sequence
        inputs, targets = mx.array(padded[:, :-1]), padded[:, 1:]
        cache = make_prompt_cache(self._model)
        columns = []
        for offset in range(0, inputs.shape[1], STEP_SIZE):
            window = inputs[:, offset : offset + STEP_SIZE]
            passed = self.scorer.forward(window, cache)
            pairs = [
                (row, pos)
                for row in range(len(batch))
                for pos in range(window.shape[1])
                if offset + pos < lengths[row] - 1
            ]
            flat = mx.zeros((len(batch) * window.shape[1],), dtype=mx.float32)
            if pairs:
                rows, positions = zip(*pairs, strict=True)
                scores = self.scorer.score(
                    passed, rows, positions, [int(targets[r, offset + p]) for r, p in pairs]
                )
                index = mx.array([r * window.shape[1] + p for r, p in pairs])
                flat[index] = scores.logprobs
            columns.append(flat.reshape(len(batch), window.shape[1]))
            mx.eval(columns[-1])
        if not columns:
            return [0.0] * len(batch)
        return mx.concatenate(columns, axis=1).sum(axis=-1).tolist()

    # -- generation -------------------------------------------------------------------------

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Generate for each request until one of its ``until`` strings, inside the loop.

        Afterwards, per request: ``generation_counts`` (tokens generated, the end of
        sequence included) and ``generation_details`` (per token of the output: ``layers``,
        ``changed``, ``head_rows``; and ``final_layer``); ``generation_stats`` adds them
        up (tokens, time, non-final and changed shares, extra head rows per token)."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        texts: list[str] = [""] * len(requests)
        self.generation_counts = [0] * len(requests)
        self.generation_details = [{} for _ in requests]
        tic = time.perf_counter()
        size = self.args.batch_size
        chunks = []
        for indices in groups.values():
            options, until = self._options(dict(requests[indices[0]].args[1]))
            for start in range(0, len(indices), size):
                chunks.append((indices[start : start + size], options, until))

        def compute(chunk: tuple[list[int], Any, list[str]]) -> list[tuple[str, int, dict]]:
            indices, options, until = chunk
            prompts = [self._encode(requests[i].args[0]) for i in indices]
            return self._generate(prompts, options, until)

        done = shared(self.group, requests, chunks, compute, "generate_until")
        for (indices, _, _), generated in zip(chunks, done, strict=True):
            for i, (text, count, details) in zip(indices, generated, strict=True):
                texts[i] = text
                self.generation_counts[i] = count
                self.generation_details[i] = details
        tokens_total = sum(self.generation_counts)
        seconds = time.perf_counter() - tic
        figures = _figures(self.generation_details)
        self.generation_stats = {
            "tokens": tokens_total,
            "seconds": seconds,
            "tokens_per_second": tokens_total / max(seconds, 1e-9),
            "non_final_share": figures.non_final_share,
            "changed_share": figures.changed_share,
            "extra_head_rows_per_token": figures.extra_head_rows,
        }
        logger.info(
            "layerdecode: generated %d tokens in %.1f s (%.1f tokens/s); non-final %s, "
            "changed %s, extra head rows per token %s",
            tokens_total,
            seconds,
            self.generation_stats["tokens_per_second"],
            _shown(figures.non_final_share, "{:.1%}"),
            _shown(figures.changed_share, "{:.2%}"),
            _shown(figures.extra_head_rows, "{:.3f}"),
        )
        return texts

    def _options(self, gen_kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
        from layerdecode.options import GenerationOptions

        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        budget = self.args.max_tokens or int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_TOKENS))
        chosen: dict[str, Any] = {"max_tokens": budget, "stop": list(until) or None}
        for key, field in _GEN_KWARGS.items():
            if gen_kwargs.get(key) is not None:
                value = gen_kwargs[key]
                chosen[field] = int(value) if field == "top_k" else float(value)
        if not gen_kwargs.get("do_sample", True):
            chosen["temp"] = 0.0
        ignored = sorted(set(gen_kwargs) - set(_GEN_KWARGS) - _SKIPPED_GEN_KWARGS)
        if ignored:
            logger.warning("layerdecode: ignoring generation kwargs %s", ", ".join(ignored))
        options = GenerationOptions.build(**chosen).over(self.resolved.generation)
        return options, list(until)

    def _generate(
        self, prompts: list[list[int]], options: Any, until: list[str]
    ) -> list[tuple[str, int, dict[str, Any]]]:
        """(answer text, generated tokens, per-token details) per prompt; each row ends at
        its first stop string.

        The text is cut at the first stop string, as mlx_lm.evaluate cuts it; a thinking
        model's reasoning is then left out.
        """
        from layerdecode.engine import Engine, Plan
        from layerdecode.reasoning import split_reasoning

        engine = Engine(self._model, self.tokenizer)
        plan = Plan(self.resolved, options)
        for i, prompt in enumerate(prompts):
            engine.add(prompt, plan, key=i)
        tokens: list[list[int | None]] = [[] for _ in prompts]
        details: list[dict[str, Any]] = [
            {"final_layer": engine.num_layers - 1, "layers": [], "changed": [], "head_rows": []}
            for _ in prompts
        ]
        for events in engine.run():
            for event in events:
                tokens[event.row].append(event.token if event.in_output else None)
                if event.in_output:
                    row = details[event.row]
                    row["layers"].append(event.layer)
                    row["changed"].append(event.changed)
                    row["head_rows"].append(event.head_rows)
        out = []
        for prompt, row_tokens, row in zip(prompts, tokens, details, strict=True):
            kept = [t for t in row_tokens if t is not None]
            text = _cut_at_first(self.tokenizer.decode(kept), until)
            answer, _ = split_reasoning(self.tokenizer, text, prompt)
            out.append((answer, len(row_tokens), row))
        return out
