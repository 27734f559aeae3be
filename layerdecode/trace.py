"""Per-token traces: one Parquet row per generated token, written while the run goes on.

A trace is a directory (``run.parquet/``, say) of Parquet files, one per flush::

    run.parquet/
      _trace.json            format, run id; on a clean close also "complete", rows, parts
      part-000000.parquet    the first rows_per_group rows (one row group)
      part-000001.parquet    ...

Rows are gathered in memory and written every ``rows_per_group`` rows and on close. Each
part is written under a hidden name (``.part-000001.parquet.tmp``), synced, then renamed:
a rename is atomic, so every ``part-*.parquet`` is a whole Parquet file with its footer,
and a run killed at any moment keeps every part written before the kill (it loses only the
rows not yet flushed). :func:`read_trace` reads the parts in order; pyarrow, pandas,
polars (``"run.parquet/*.parquet"``) and DuckDB read the directory as one table too,
since they pass over names that begin with ``_`` or ``.``.

Columns (:data:`COLUMNS`): ``run_id``, ``item_id``, ``strategy``, ``position`` (0-based
index of the token in its generation), ``token_id``, ``token_text``, ``part``
(``answer`` or ``reasoning``), ``layer`` (the chosen layer), ``depth`` (layers below the
final one), ``changed`` (the token differs from the final layer's; null where that cannot
be told), ``head_rows`` (vocabulary-head rows the step cost, the final layer's included),
``entropy`` (of the chosen layer, nats) and ``candidates``: every layer the strategy read
for the token, as ``list<struct<layer: int16, entropy: float32>>`` (empty unless the
generation asked for them).

pyarrow is an optional dependency: ``pip install 'layerdecode[trace]'``.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

    from .engine import TokenEvent
    from .generation import GenerationResult

__all__ = [
    "COLUMNS",
    "TraceWriter",
    "entropy_by_depth",
    "read_trace",
    "require_pyarrow",
    "trace_status",
]

FORMAT = "layerdecode-trace/1"
INFO = "_trace.json"
DEFAULT_ROWS_PER_GROUP = 4096
INSTALL_HINT = "Traces need pyarrow: pip install 'layerdecode[trace]'"
COLUMNS = (
    "run_id",
    "item_id",
    "strategy",
    "position",
    "token_id",
    "token_text",
    "part",
    "layer",
    "depth",
    "changed",
    "head_rows",
    "entropy",
    "candidates",
)


def require_pyarrow() -> Any:
    """The ``pyarrow`` module, or a ConfigError that says how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return pyarrow


def schema() -> pa.Schema:
    """The trace's Arrow schema."""
    pa = require_pyarrow()
    candidate = pa.struct([("layer", pa.int16()), ("entropy", pa.float32())])
    return pa.schema(
        [
            ("run_id", pa.string()),
            ("item_id", pa.string()),
            ("strategy", pa.string()),
            ("position", pa.int32()),
            ("token_id", pa.int32()),
            ("token_text", pa.string()),
            ("part", pa.string()),
            ("layer", pa.int16()),
            ("depth", pa.int16()),
            ("changed", pa.bool_()),
            ("head_rows", pa.int16()),
            ("entropy", pa.float32()),
            ("candidates", pa.list_(candidate)),
        ],
        metadata={"format": FORMAT},
    )


def _part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


class TraceWriter:
    """Writes a trace directory (see the module docstring); use it as a context manager.

    Args:
        path: the directory to write (created; an existing non-empty one is refused unless
            ``resume``).
        decode: turns one token id into its text (``tokenizer.decode([id])``); without
            it, ``token_text`` is empty.
        run_id: names this run in every row (default: a new random id; on resume, the
            trace's own).
        rows_per_group: rows per flushed part (one Parquet row group each).
        resume: add parts to an existing trace (an eval run resumed with ``--resume``).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        decode: Callable[[int], str] | None = None,
        run_id: str | None = None,
        rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
        resume: bool = False,
    ) -> None:
        self.pa = require_pyarrow()
        if rows_per_group < 1:
            raise ConfigError(f"rows_per_group must be at least 1, got {rows_per_group}.")
        self.path = Path(path)
        self.schema = schema()
        self.rows_per_group = rows_per_group
        self.decode = decode
        self._texts: dict[int, str] = {}
        existing = self._open(resume)
        self.run_id = run_id or existing or uuid.uuid4().hex[:12]
        self._write_info({"format": FORMAT, "run_id": self.run_id, "complete": False})
        self._columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        self.rows = 0  # rows added, flushed or not
        self.closed = False

    @staticmethod
    def check(path: str | Path, *, resume: bool = False) -> None:
        """Refuse, before any work, a path the writer would refuse (and a missing pyarrow)."""
        require_pyarrow()
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file; a trace is a directory: choose another path.")
        # A trace without parts holds no rows: a run that stopped before its first may reuse it.
        if not resume and path.is_dir() and any(p.name != INFO for p in path.iterdir()):
            raise ConfigError(f"{path} exists and is not empty: choose another trace path.")

    def _open(self, resume: bool) -> str | None:
        """Check the directory; on resume, the next part's number and the trace's run id."""
        path = self.path
        self.check(path, resume=resume)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".part-*.tmp"):  # a part being written when a run was killed
            stale.unlink()
        parts = _parts(path)
        self.next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        try:
            return json.loads((path / INFO).read_text(encoding="utf-8")).get("run_id")
        except (OSError, ValueError, AttributeError):
            return None

    # -- adding rows ---------------------------------------------------------------------

    def add(
        self,
        item_id: str,
        strategy: str,
        position: int,
        *,
        token: int,
        layer: int,
        final_layer: int,
        changed: bool | None = False,
        head_rows: int = 1,
        entropy: float = 0.0,
        candidates: Mapping[int, float] | None = None,
        part: str = "answer",
    ) -> None:
        """One generated token."""
        c = self._columns
        c["run_id"].append(self.run_id)
        c["item_id"].append(str(item_id))
        c["strategy"].append(strategy)
        c["position"].append(position)
        c["token_id"].append(token)
        c["token_text"].append(None)  # decoded when flushed
        c["part"].append(part)
        c["layer"].append(layer)
        c["depth"].append(final_layer - layer)
        c["changed"].append(None if changed is None else bool(changed))
        c["head_rows"].append(head_rows)
        c["entropy"].append(entropy)
        c["candidates"].append([{"layer": k, "entropy": v} for k, v in (candidates or {}).items()])
        self.rows += 1
        if len(c["position"]) >= self.rows_per_group:
            self.flush()

    def add_event(self, item_id: str, strategy: str, position: int, event: TokenEvent) -> None:
        """A token as it streams out of the engine."""
        self.add(
            item_id,
            strategy,
            position,
            token=event.token,
            layer=event.layer,
            final_layer=event.num_layers - 1,
            changed=event.changed,
            head_rows=event.head_rows,
            entropy=event.entropy,
            candidates=event.candidates,
            part=event.part,
        )

    def add_result(self, item_id: str, strategy: str, result: GenerationResult) -> None:
        """Every token of a finished generation."""
        final = result.num_layers - 1
        n = len(result.tokens)
        changed = result.changed or [False] * n
        head_rows = result.head_rows or [1] * n
        candidates = result.candidates or [{}] * n
        parts = result.parts or ["answer"] * n
        for i in range(n):
            self.add(
                item_id,
                strategy,
                i,
                token=result.tokens[i],
                layer=result.layers[i],
                final_layer=final,
                changed=changed[i],
                head_rows=head_rows[i],
                entropy=result.entropies[i],
                candidates=candidates[i],
                part=parts[i],
            )

    # -- writing -------------------------------------------------------------------------

    def _text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.decode(token) if self.decode else ""
        return text

    def flush(self) -> None:
        """Write the rows gathered so far as the next part (nothing if there are none)."""
        c = self._columns
        if not c["position"]:
            return
        c["token_text"] = [self._text(t) for t in c["token_id"]]
        table = self.pa.Table.from_pydict(c, schema=self.schema)
        final = self.path / _part_name(self.next_part)
        temporary = self.path / f".{final.name}.tmp"
        import pyarrow.parquet as pq

        with temporary.open("wb") as handle:
            pq.write_table(table, handle, row_group_size=len(table))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        self.next_part += 1
        self._columns = {name: [] for name in COLUMNS}

    def close(self) -> None:
        """Flush the last rows and mark the trace complete (idempotent)."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        parts = _parts(self.path)
        rows = sum(_row_count(p) for p in parts)
        self._write_info(
            {
                "format": FORMAT,
                "run_id": self.run_id,
                "complete": True,
                "rows": rows,
                "parts": len(parts),
            }
        )

    def _write_info(self, info: dict[str, Any]) -> None:
        temporary = self.path / f".{INFO}.tmp"
        temporary.write_text(json.dumps(info) + "\n", encoding="utf-8")
        os.replace(temporary, self.path / INFO)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _row_count(part: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(part).metadata.num_rows


def read_trace(path: str | Path) -> pa.Table:
    """The rows of a trace, complete or cut short by a killed run, as a ``pyarrow.Table``.

    ``path`` is a trace directory (every whole part, in the order written) or a single
    Parquet file. A part that cannot be read (a copy cut short, say) is skipped with a
    warning; the parts before and after it are kept.
    """
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_file():
        return pq.read_table(path)
    if not path.is_dir():
        raise ConfigError(f"Trace {path} not found.")
    tables = []
    for part in _parts(path):
        try:
            tables.append(pq.read_table(part))
        except (OSError, pa.ArrowInvalid) as error:
            warnings.warn(f"{part}: skipped, not a whole Parquet file ({error})", stacklevel=2)
    if not tables:
        return schema().empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def trace_status(path: str | Path) -> dict[str, Any]:
    """What a trace directory holds: run id, parts, rows, and whether it was closed."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"Trace {path} not found (a trace is a directory).")
    try:
        info = json.loads((path / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    return {
        "run_id": info.get("run_id"),
        "complete": bool(info.get("complete")),
        "parts": len(_parts(path)),
        "rows": read_trace(path).num_rows,
    }


def entropy_by_depth(table: pa.Table) -> dict[str, dict[int, tuple[float, int]]]:
    """Mean entropy of the candidate layers read, by depth below the final layer, for the
    changed tokens and for the others: ``{"changed": {depth: (mean nats, readings)},
    "unchanged": {...}}``. Tokens whose change could not be told are left out."""
    require_pyarrow()
    import numpy as np
    import pyarrow.compute as pc

    candidates = table.column("candidates").combine_chunks()
    parents = pc.list_parent_indices(candidates).to_numpy()
    flat = pc.list_flatten(candidates)
    layers = flat.field("layer").to_numpy(zero_copy_only=False).astype(np.int64)
    entropy = flat.field("entropy").to_numpy(zero_copy_only=False).astype(np.float64)
    final = (
        table.column("layer").to_numpy().astype(np.int64)
        + table.column("depth").to_numpy().astype(np.int64)
    )[parents]
    changed = table.column("changed").to_pylist()
    flags = np.array([c is True for c in changed], dtype=bool)[parents]
    known = np.array([c is not None for c in changed], dtype=bool)[parents]
    depth = final - layers
    out: dict[str, dict[int, tuple[float, int]]] = {}
    for name, mask in (("changed", flags & known), ("unchanged", ~flags & known)):
        means: dict[int, tuple[float, int]] = {}
        for d in np.unique(depth[mask]):
            values = entropy[mask & (depth == d)]
            means[int(d)] = (float(values.mean()), int(values.size))
        out[name] = means
    return out
