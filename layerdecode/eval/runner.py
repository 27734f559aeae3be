"""Run a task over a data file with several strategies, record every answer, summarise.

Each (item, strategy) pair is generated with batched decoding, scored, and appended to
the results file as soon as it is done; a resumed run skips the pairs already there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..distributed import ProcessGroup
from ..errors import ConfigError
from ..options import DEFAULT_MAX_TOKENS, GenerationOptions
from ..prompts import build_prompt
from .records import EvalRecord, ResultsStore, RunConfig, StrategySpec, file_sha256
from .stats import Summary, summarize
from .tasks import Item, Task, get_task

if TYPE_CHECKING:
    from ..trace import TraceWriter


@dataclass
class EvalPlan:
    """Everything an eval run needs, checked before the model is loaded."""

    config: RunConfig
    task: Task
    items: list[Item]
    strategies: dict[str, Any]  # name as given -> ResolvedStrategy
    options: GenerationOptions
    chat: bool
    chat_template_kwargs: dict[str, Any] | None = None


def plan_eval(
    *,
    model: str,
    task: str,
    data: str | Path,
    strategies: Sequence[str],
    task_options: dict[str, Any] | None = None,
    offset: int = 0,
    limit: int | None = None,
    chat: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    max_tokens: int | None = None,
    options: GenerationOptions | dict[str, Any] | None = None,
    **generation: Any,
) -> EvalPlan:
    """Validate the task, data, strategies and options; nothing is generated yet.

    ``options`` (or keyword ``generation`` options) are the generation options of every
    strategy, over each preset's own defaults; ``max_tokens`` defaults to 256.
    ``chat_template_kwargs`` are further arguments of the chat template
    (``{"enable_thinking": False}``).
    """
    from ..config import resolve_strategy
    from ..prompts import check_template_kwargs

    if not strategies:
        raise ConfigError("Give at least one strategy (the first one is the baseline).")
    if len(set(strategies)) != len(strategies):
        raise ConfigError(f"Strategies must be distinct, got {', '.join(strategies)}.")
    if offset < 0 or (limit is not None and limit < 1):
        raise ConfigError("offset must be >= 0 and limit >= 1.")
    chosen = GenerationOptions.build(options, max_tokens=max_tokens, **generation)
    if chosen.max_tokens is None:
        chosen = GenerationOptions.build(chosen, max_tokens=DEFAULT_MAX_TOKENS)
    if chosen.max_tokens < 1:
        raise ConfigError(f"max_tokens must be positive, got {chosen.max_tokens}.")
    task_obj = get_task(task, **(task_options or {}))
    items = task_obj.load(data, offset=offset, limit=limit)
    resolved = {spec: resolve_strategy(spec) for spec in strategies}
    gen = {**chosen.set_values(), "chat": chat}
    if chat_template_kwargs is not None:  # kept out of older runs' configuration
        if not chat:
            raise ConfigError("chat_template_kwargs needs the chat template: drop chat=False.")
        chat_template_kwargs = check_template_kwargs(chat_template_kwargs)
        gen["chat_template_kwargs"] = chat_template_kwargs
    config = RunConfig(
        model=model,
        task=task,
        task_options=dict(task_options or {}),
        strategies=[
            StrategySpec(
                name=spec,
                params={
                    "strategy": r.strategy.name,
                    **r.strategy.resolved_params(),
                    **{f"generation.{k}": v for k, v in r.generation.set_values().items()},
                },
            )
            for spec, r in resolved.items()
        ],
        generation=gen,
        data_path=str(Path(data).resolve()),
        data_sha256=file_sha256(data),
        offset=offset,
        limit=limit,
    )
    return EvalPlan(config, task_obj, items, resolved, chosen, chat, chat_template_kwargs)


def changed_at(changed: list[bool | None]) -> list[int] | None:
    """Positions of the changed tokens; None when some could not be told."""
    if None in changed:
        return None
    return [i for i, c in enumerate(changed) if c]


def difficulty_of(item: Item) -> str | None:
    """The item's ``level`` or ``difficulty`` field (MATH: ``"Level 5"``), if it has one."""
    for key in ("level", "difficulty"):
        value = item.record.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def _prompt_ids(tokenizer, item: Item, plan: EvalPlan) -> list[int]:
    prompt = item.prompt if plan.chat else item.prompt_text
    return build_prompt(
        tokenizer, prompt, chat=plan.chat, chat_template_kwargs=plan.chat_template_kwargs
    )


def run_eval(
    model_obj,
    tokenizer,
    plan: EvalPlan,
    out: str | Path,
    *,
    resume: bool = False,
    batch_size: int = 8,
    progress: Callable[[int, int, str], None] | None = None,
    group: ProcessGroup | None = None,
    trace: TraceWriter | None = None,
) -> tuple[Summary | None, ResultsStore | None]:
    """Generate and score every pending (item, strategy) pair; return the summary.

    ``trace`` (a :class:`~layerdecode.trace.TraceWriter`) gets one row per generated
    token of every pair run now, written out (one part per pair) before the pair's record,
    so every recorded pair has its rows; it is refused with several ranks.

    ``progress`` is called with (pairs done, pairs in total, strategy) as pairs finish.
    Under a :class:`~layerdecode.distributed.ProcessGroup` of several ranks, rank 0 alone
    opens and writes ``out`` and tells the others what is pending; in ``data`` mode each
    rank decodes its share of the item chunks and rank 0 writes every rank's records in
    item order after each round. Ranks other than 0 return ``(None, None)``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    group = group or ProcessGroup()
    if trace is not None and group.shares > 1:
        raise ConfigError("A trace is written by one process: drop --trace under mlx.launch.")
    store = ResultsStore.open(out, plan.config, resume=resume) if group.is_main else None
    try:
        _run_pending(model_obj, tokenizer, plan, store, group, batch_size, progress, trace)
        if store is None:
            return None, None
        return summarize(store.records, plan.config.strategy_names), store
    finally:
        if store is not None:
            store.close()


def _run_pending(model_obj, tokenizer, plan, store, group, batch_size, progress, trace) -> None:
    names = list(plan.strategies)
    keys = [(item.id, name) for item in plan.items for name in names]
    # Rank 0 holds the results file: it says which pairs are still to run.
    mask = group.broadcast(bytes(not store.is_done(*key) for key in keys) if store else None)
    pending = {key for key, todo in zip(keys, mask, strict=True) if todo}
    total, done = len(keys), len(keys) - len(pending)
    if progress is not None and store is not None:
        progress(done, total, "")
    # Items go in chunks, each run through every strategy before the next chunk, so an
    # interrupted run already holds paired results for every strategy. Under data
    # parallelism the k-th chunk with pending pairs goes to rank k % shares, and each
    # round ends with a gather.
    every = [
        plan.items[start : start + batch_size] for start in range(0, len(plan.items), batch_size)
    ]
    chunks = [c for c in every if any((i.id, n) in pending for i in c for n in names)]
    order = {key: i for i, key in enumerate(keys)}
    # One share: each record is written as it finishes; several: after each round's gather.
    streaming = group.shares == 1

    def write(record: EvalRecord) -> None:
        nonlocal done
        if store is not None:
            store.append(record)
            done += 1
            if progress is not None:
                progress(done, total, record.strategy)

    for first in range(0, len(chunks), group.shares):
        index = first + group.share
        chunk = chunks[index] if index < len(chunks) else []
        records: list[EvalRecord] = []

        def keep(record: EvalRecord, records=records) -> None:
            group.beat()
            if streaming:
                write(record)
            else:
                records.append(record)

        with group.watch("decoding") if group.tensor else nullcontext():
            _decode_chunk(model_obj, tokenizer, plan, chunk, pending, keep, batch_size, trace)
        if streaming:
            continue
        gathered = group.gather("".join(r.model_dump_json() + "\n" for r in records).encode())
        if store is None or gathered is None:
            continue
        arrived = [
            EvalRecord.model_validate_json(line)
            for payload in gathered
            for line in payload.decode().splitlines()
        ]
        for record in sorted(arrived, key=lambda r: order[r.key]):
            write(record)


def _decode_chunk(model_obj, tokenizer, plan, chunk, pending, keep, batch_size, trace) -> None:
    """Every pending (item, strategy) pair of ``chunk``, batched per strategy."""
    from ..batch import batch_generate

    task = plan.task
    for name, resolved in plan.strategies.items():
        todo = [item for item in chunk if (item.id, name) in pending]
        if not todo:
            continue
        prompts = [_prompt_ids(tokenizer, item, plan) for item in todo]
        started = datetime.now(timezone.utc)

        def record(index: int, result, name=name, todo=todo, started=started):
            item = todo[index]
            score = task.score(result.text, item)
            if trace is not None:  # durable before the record: a recorded pair has its rows
                trace.add_result(item.id, name, result)
                trace.flush()
            keep(
                EvalRecord(
                    item_id=item.id,
                    strategy=name,
                    prompt=item.prompt if plan.chat else item.prompt_text,
                    output=result.text,
                    reasoning=result.reasoning,
                    extracted=score.extracted,
                    gold=item.gold,
                    correct=score.correct,
                    n_tokens=len(result.tokens),
                    prompt_tokens=len(result.prompt_tokens),
                    tokens_per_sec=result.generation_tps,
                    hit_token_limit=result.finish_reason == "length",
                    layers=result.layers,
                    parts=result.parts if result.reasoning is not None else [],
                    final_layer=result.num_layers - 1,
                    changed_at=changed_at(result.changed),
                    head_rows=sum(result.head_rows),
                    difficulty=difficulty_of(item),
                    started_at=started,
                    finished_at=datetime.now(timezone.utc),
                )
            )

        batch_generate(
            model_obj,
            tokenizer,
            prompts,
            strategy=resolved,
            batch_size=batch_size,
            on_result=record,
            options=plan.options,
            candidates=trace is not None,
        )


def evaluate(
    model: Any,
    tokenizer: Any = None,
    *,
    task: str,
    data: str | Path,
    out: str | Path,
    strategies: Sequence[str] = ("final", "confident", "dola"),
    model_name: str | None = None,
    resume: bool = False,
    batch_size: int = 8,
    progress: Callable[[int, int, str], None] | None = None,
    group: ProcessGroup | None = None,
    trace: TraceWriter | None = None,
    **plan_options: Any,
) -> Summary | None:
    """Run ``strategies`` on a task's data file, like ``layerdecode eval``; return the summary.

    ``model`` is a name or path, loaded with :func:`layerdecode.load`, or a model already
    loaded, passed with its ``tokenizer``. The results file ``out`` gets one record per
    (item, strategy) as each finishes; ``resume=True`` continues it. Its configuration names
    the model by ``model_name`` (default: the name or path given, else the architecture),
    so give distinct names to tell loaded models apart on resume. ``plan_options`` are
    :func:`plan_eval`'s: ``task_options`` (``shots``, ``exemplars``, ``system_prompt``,
    ...), ``offset``, ``limit``, ``chat``, ``chat_template_kwargs``, ``max_tokens``, and
    ``options`` (a :class:`~layerdecode.options.GenerationOptions`) or generation options
    as keywords (``temp``, ``top_p``, ``seed``, ``stop``, ...), which apply to every
    strategy; greedy, at most 256 new tokens by default. Everything is checked before the
    model is loaded.
    ``group`` (see :func:`layerdecode.distributed.init`) runs the eval on several ranks;
    ranks other than 0 return None. ``trace`` (a :class:`~layerdecode.trace.TraceWriter`)
    records every generated token.
    """
    by_name = isinstance(model, (str, Path))
    if by_name:
        if tokenizer is not None:
            raise ConfigError("Pass a tokenizer only with a model that is already loaded.")
        name = model_name or str(model)
    else:
        if tokenizer is None:
            raise ConfigError("A loaded model needs its tokenizer: evaluate(model, tokenizer).")
        args = getattr(model, "args", None)
        name = model_name or getattr(args, "model_type", None) or type(model).__name__
    plan = plan_eval(model=name, task=task, data=data, strategies=list(strategies), **plan_options)
    if by_name:
        from ..loading import load

        model, tokenizer = load(model, group=group)
    summary, _ = run_eval(
        model,
        tokenizer,
        plan,
        out,
        resume=resume,
        batch_size=batch_size,
        progress=progress,
        group=group,
        trace=trace,
    )
    return summary
