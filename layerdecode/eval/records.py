"""Append-only JSONL store of evaluation results, safe to kill and resume.

File layout: line 1 is a header ``{"format": "layerdecode-eval/1", "config": {...}, ...}``
holding the ``RunConfig``; every further line is one ``EvalRecord``, the result of one
(item, strategy) pair, written as a single line with flush and fsync as soon as it is done.

Rules, checked by ``ResultsStore.open``:

* Without ``resume``, an existing non-empty file is refused, so a finished run is never mixed
  with a new one by accident. With ``resume``, a missing or empty file simply starts a run.
* Resuming truncates a trailing incomplete line (a kill during a write), then refuses unless
  the stored configuration equals the new one; the message names the differing keys. The data
  file is compared by content (``data_sha256``), not by path.
* Records are keyed by (item id, strategy): resumed runs skip done pairs and ``append``
  refuses a duplicate.
* An exclusive ``fcntl.flock`` on the file keeps a second run from writing it at the same time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layerdecode.errors import ConfigError

from ..layerstats import layer_stats

__all__ = [
    "FORMAT",
    "StrategySpec",
    "RunConfig",
    "EvalRecord",
    "ResultsStore",
    "read_results",
    "file_sha256",
    "layer_stats",
    "config_differences",
]

FORMAT = "layerdecode-eval/1"
# Keys that may change between a run and its resumption: the data is identified by its hash.
RESUME_IGNORED = frozenset({"data_path"})


class StrategySpec(BaseModel):
    """A strategy as run: its name in the results and its fully resolved parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class RunConfig(BaseModel):
    """Everything that decides the results of a run; resuming requires it unchanged.

    The first strategy is the baseline that the others are compared with.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="Model name or path as given.")
    task: str = Field(min_length=1)
    task_options: dict[str, Any] = Field(default_factory=dict)
    strategies: list[StrategySpec] = Field(min_length=1)
    generation: dict[str, Any] = Field(
        default_factory=dict, description="max_tokens, temperature, seed, chat template use..."
    )
    data_path: str
    data_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    offset: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)

    @field_validator("strategies")
    @classmethod
    def _unique_names(cls, strategies: list[StrategySpec]) -> list[StrategySpec]:
        names = [s.name for s in strategies]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"strategy names must be unique; repeated: {', '.join(repeated)}")
        return strategies

    @property
    def strategy_names(self) -> list[str]:
        return [s.name for s in self.strategies]


class EvalRecord(BaseModel):
    """The result of one (item, strategy) pair.

    ``layers`` holds the layer index each generated token was decoded from and ``final_layer``
    the index of the model's last layer, in the same numbering; ``share_non_final`` and
    ``mean_depth_below_final`` are derived from them (any value passed in is recomputed).
    ``hit_token_limit`` is true when generation stopped at the max-token cap rather than at an
    end-of-sequence token -- usually a sign of a repetition loop. ``output`` is the answer
    the score was taken from; a thinking model's reasoning is in ``reasoning``, and
    ``parts`` then says of each token whether it was the ``reasoning``'s or the ``answer``'s
    (empty: every token was the answer's).

    ``changed_at`` lists the token positions whose token differs from the one the final
    layer alone would have given, and ``head_rows`` the vocabulary-head rows the tokens cost
    (one per token for the final layer); ``n_changed``, ``share_changed`` and
    ``extra_head_rows_per_token`` are derived from them. All are None in records written
    before they were recorded. ``difficulty`` is the item's ``level`` or ``difficulty``
    field when the data has one (the MATH convention).
    """

    model_config = ConfigDict(extra="forbid")

    item_id: str
    strategy: str
    prompt: str | list[dict[str, str]]
    output: str
    reasoning: str | None = None
    extracted: str | None
    gold: str
    correct: bool
    n_tokens: int = Field(ge=0, description="Generated tokens.")
    prompt_tokens: int | None = Field(None, ge=0)
    tokens_per_sec: float = Field(ge=0, description="Generation speed, prompt excluded.")
    hit_token_limit: bool
    layers: list[int] = Field(default_factory=list)
    parts: list[Literal["reasoning", "answer"]] = Field(default_factory=list)
    final_layer: int = Field(ge=0)
    share_non_final: float | None = None
    mean_depth_below_final: float | None = None
    changed_at: list[int] | None = None
    n_changed: int | None = None
    share_changed: float | None = None
    head_rows: int | None = Field(None, ge=0)
    extra_head_rows_per_token: float | None = None
    difficulty: str | None = None
    started_at: datetime
    finished_at: datetime

    @model_validator(mode="after")
    def _derive_layer_stats(self) -> EvalRecord:
        bad = [layer for layer in self.layers if not 0 <= layer <= self.final_layer]
        if bad:
            raise ValueError(f"layers must lie in 0..final_layer={self.final_layer}; got {bad[0]}")
        if self.parts and len(self.parts) != len(self.layers):
            raise ValueError(f"parts has {len(self.parts)} entries for {len(self.layers)} layers")
        share, depth = layer_stats(self.layers, self.final_layer)
        object.__setattr__(self, "share_non_final", share)
        object.__setattr__(self, "mean_depth_below_final", depth)
        n = len(self.layers)
        changed = share_changed = extra = None
        if self.changed_at is not None:
            if any(not 0 <= p < n for p in self.changed_at):
                raise ValueError(f"changed_at positions must lie in 0..{n - 1}")
            changed = len(set(self.changed_at))
            share_changed = changed / n if n else None
        if self.head_rows is not None and n:
            extra = (self.head_rows - n) / n
        object.__setattr__(self, "n_changed", changed)
        object.__setattr__(self, "share_changed", share_changed)
        object.__setattr__(self, "extra_head_rows_per_token", extra)
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.item_id, self.strategy)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (identifies the data file in ``RunConfig``)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in items:
        flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    if not flat and prefix:
        flat[prefix] = value
    return flat


def config_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys whose values differ (``model``, ``strategies.1.params.alpha``...)."""
    a = _flatten(old.model_dump(mode="json"))
    b = _flatten(new.model_dump(mode="json"))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...))
    return [k for k in keys if k.split(".")[0] not in RESUME_IGNORED]


def _parse(lines: list[bytes], path: Path) -> tuple[RunConfig, list[EvalRecord]]:
    """Header and records from complete lines; ConfigError names the first bad line."""
    try:
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f'first line lacks "format": "{FORMAT}"')
        config = RunConfig.model_validate(header.get("config"))
    except (ValueError, ValidationError) as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"{path}:1: not a layerdecode eval results file ({reason})") from None
    records: list[EvalRecord] = []
    seen: dict[tuple[str, str], int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            record = EvalRecord.model_validate_json(line)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            raise ConfigError(
                f"{path}:{number}: bad result record ({where}: {first['msg']})"
            ) from None
        if record.key in seen:
            raise ConfigError(
                f"{path}:{number}: duplicate result for item '{record.item_id}', strategy "
                f"'{record.strategy}' (first on line {seen[record.key]})"
            )
        seen[record.key] = number
        records.append(record)
    return config, records


def read_results(path: str | Path) -> tuple[RunConfig, list[EvalRecord]]:
    """Configuration and records of a results file, read-only and without locking; a
    trailing incomplete line (a run killed mid-write, or still writing) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Results file {path} not found")
    data = path.read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    if not lines:
        raise ConfigError(f"{path}: empty results file")
    return _parse(lines, path)


class ResultsStore:
    """An open, locked results file. Use ``ResultsStore.open(...)`` as a context manager::

    with ResultsStore.open(out, config, resume=resume) as store:
        for item in items:
            for strategy in config.strategy_names:
                if not store.is_done(item.id, strategy):
                    store.append(run_one(item, strategy))
    """

    def __init__(self, path: Path, fd: int, config: RunConfig, records: list[EvalRecord]):
        self.path = path
        self.config = config
        self.records = records
        self.dropped_bytes = 0  # size of the incomplete last line removed on resume
        self._fd = fd
        self._done = {record.key for record in records}

    @classmethod
    def open(cls, path: str | Path, config: RunConfig, *, resume: bool = False) -> ResultsStore:
        """Create ``path`` with a header, or reopen it to resume (see module docstring)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"{path} is being written by another layerdecode eval run; wait for it or "
                    "choose another --out"
                ) from None
            return cls._load(path, fd, config, resume)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load(cls, path: Path, fd: int, config: RunConfig, resume: bool) -> ResultsStore:
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read()
        if data and not resume:
            raise ConfigError(
                f"{path} exists; pass --resume to continue it or choose another --out"
            )
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            os.ftruncate(fd, complete)
            os.fsync(fd)
        lines = data[:complete].splitlines()
        if not lines:
            store = cls(path, fd, config, [])
            store._write(
                {
                    "format": FORMAT,
                    "config": config.model_dump(mode="json"),
                    "created_at": _now().isoformat(),
                    "layerdecode_version": _version(),
                }
            )
        else:
            stored, records = _parse(lines, path)
            differing = config_differences(stored, config)
            if differing:
                raise ConfigError(
                    f"{path} was written with a different configuration (differs: "
                    f"{', '.join(differing)}); resume with the same options or choose another --out"
                )
            store = cls(path, fd, config, records)
        store.dropped_bytes = len(data) - complete
        return store

    def is_done(self, item_id: str, strategy: str) -> bool:
        return (item_id, strategy) in self._done

    def pending(self, item_ids: Iterable[str]) -> list[tuple[str, str]]:
        """(item id, strategy) pairs still to run, item by item in the configured order."""
        return [
            (item_id, name)
            for item_id in item_ids
            for name in self.config.strategy_names
            if (item_id, name) not in self._done
        ]

    def append(self, record: EvalRecord) -> None:
        """Write one record durably (one line, fsync) before returning."""
        if record.strategy not in self.config.strategy_names:
            raise ValueError(f"strategy '{record.strategy}' is not in this run's configuration")
        if record.key in self._done:
            raise ValueError(
                f"{self.path} already has a result for item '{record.item_id}', "
                f"strategy '{record.strategy}'"
            )
        self._write(record.model_dump(mode="json"))
        self.records.append(record)
        self._done.add(record.key)

    def _write(self, obj: dict[str, Any]) -> None:
        if self._fd < 0:
            raise ValueError(f"{self.path} is closed")
        line = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # O_APPEND: every write lands at the end of the file
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        """Release the lock and close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _version() -> str:
    from .. import __version__

    return __version__
