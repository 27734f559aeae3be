"""The process group of a job started by ``mlx.launch``: who this rank is, who writes, how
ranks share bytes, and how a dead or silent rank ends the job instead of hanging it.

Two ways to use several ranks (``--distributed``, or ``$LAYERDECODE_DISTRIBUTED``):

* ``data``: every rank loads the whole model and decodes its share of the eval items;
  rank 0 gathers the records and is the only writer.
* ``tensor``: every rank holds a slice of every layer (mlx-lm's ``Model.shard``); all ranks
  decode the same tokens in lockstep and rank 0 alone prints or writes.

A collective that gets no answer within ``$LAYERDECODE_DISTRIBUTED_TIMEOUT`` seconds
(default 600) ends the rank with one line on stderr: MLX's ring backend raises when a peer's
socket closes, but waits forever on a peer that is alive and stuck or whose machine vanished.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from layerdecode.errors import ConfigError, LayerdecodeError

__all__ = [
    "MODES",
    "ProcessGroup",
    "init",
    "launched",
    "refuse_launched",
]

MODES = ("data", "tensor")
MODE_ENV = "LAYERDECODE_DISTRIBUTED"
TIMEOUT_ENV = "LAYERDECODE_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
# Variables a launcher sets in every rank: mlx.launch (ring, jaccl, nccl) and mpirun.
_LAUNCH_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_BACKEND_MARKS = ("[ring]", "[mpi]", "[jaccl]", "[nccl]")


def launched() -> bool:
    """Whether this process was started as one rank of a distributed job."""
    return any(name in os.environ for name in _LAUNCH_VARS)


def refuse_launched(command: str) -> None:
    """Refuse a command that runs on one process only when started by a launcher."""
    if launched():
        raise ConfigError(
            f"'{command}' runs on one process; start it without mlx.launch "
            "(generate, compare and eval run on several ranks)"
        )


class _Watchdog:
    """Ends the process when a watched wait gets no progress for ``timeout`` seconds."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.what: str | None = None
        self.last = time.monotonic()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, what: str) -> Iterator[None]:
        with self._lock:
            outer, self.what, self.last = self.what, what, time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self.what, self.last = outer, time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            with self._lock:
                silent = time.monotonic() - self.last
                if self.what is None or silent < self.timeout:
                    continue
                message = (
                    f"error: rank {self.rank}: no word from the other ranks for "
                    f"{silent:.0f} s while {self.what}; a rank has died or hangs, so this "
                    f"rank stops (${TIMEOUT_ENV} sets the limit)\n"
                )
            os.write(2, message.encode())
            os._exit(1)


@dataclass
class ProcessGroup:
    """This process's place in the job; a single process is ``ProcessGroup()``.

    ``shares`` is how many parts the eval items are split into (the world size under
    ``data``, 1 otherwise) and ``share`` the part this rank decodes.
    """

    rank: int = 0
    size: int = 1
    mode: str = "data"
    timeout: float = DEFAULT_TIMEOUT
    group: Any = field(default=None, repr=False)  # mx.distributed.Group when size > 1
    _watchdog: _Watchdog | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tensor(self) -> bool:
        """Whether the model is split across the ranks (they decode in lockstep)."""
        return self.size > 1 and self.mode == "tensor"

    @property
    def shares(self) -> int:
        return self.size if self.mode == "data" else 1

    @property
    def share(self) -> int:
        return self.rank if self.mode == "data" else 0

    @contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Bound the waits inside this block by the timeout; ``beat()`` marks progress."""
        if self.size == 1:
            yield
            return
        if self._watchdog is None:
            self._watchdog = _Watchdog(self.rank, self.timeout)
        with self._watchdog.watch(what):
            yield

    def beat(self) -> None:
        if self._watchdog is not None:
            self._watchdog.beat()

    def broadcast(self, data: bytes | None) -> bytes:
        """Rank 0's ``data``, on every rank (other ranks pass None)."""
        if self.size == 1:
            return data or b""
        import mlx.core as mx

        mine = data if self.is_main and data is not None else b""
        with self.watch("waiting for rank 0"):
            length = self._all_sum(mx.array([len(mine)], dtype=mx.int64))
            n = int(length[0].item())
            if n == 0:
                return b""
            payload = _to_array(mine or bytes(n))
            return _to_bytes(self._all_sum(payload))

    def gather(self, data: bytes) -> list[bytes] | None:
        """Every share's ``data`` in rank order on rank 0; None on the others.

        Under ``tensor`` the ranks hold the same results, so rank 0 keeps its own.
        """
        rows = self.exchange(data)
        return rows if self.is_main else None

    def exchange(self, data: bytes) -> list[bytes]:
        """Every share's ``data`` in rank order, on every rank (``[data]`` with one share)."""
        if self.shares == 1:
            return [data]
        import mlx.core as mx

        with self.watch("gathering results"):
            lengths = self._all_gather(mx.array([len(data)], dtype=mx.int64)).tolist()
            width = max(lengths)
            if width == 0:
                return [b""] * self.size
            rows = self._all_gather(_to_array(data.ljust(width, b"\0")))
        rows = rows.reshape(self.size, width)
        return [_to_bytes(row[:n]) for row, n in zip(rows, lengths, strict=True)]

    def _all_sum(self, x):
        import mlx.core as mx

        with backend_errors(self.rank):
            out = mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)
            mx.eval(out)
        return out

    def _all_gather(self, x):
        import mlx.core as mx

        with backend_errors(self.rank):
            out = mx.distributed.all_gather(x, group=self.group, stream=mx.cpu)
            mx.eval(out)
        return out

    @contextmanager
    def running(self) -> Iterator[ProcessGroup]:
        """The body of a command: ranks but 0 print nothing, except their own failures,
        and a lost peer becomes one line that names this rank.

        Ranks other than 0 keep stdout and stderr silenced until the process ends.
        """
        if self.size == 1:
            yield self
            return
        real_err = sys.stderr
        if not self.is_main:
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        try:
            with backend_errors(self.rank):
                yield self
        except ConfigError:
            raise  # bad input is the same on every rank: rank 0 reports it
        except Exception as error:
            message = " ".join(str(error).split())
            if not self.is_main and message:
                if not message.startswith(f"rank {self.rank}:"):
                    message = f"rank {self.rank}: {message}"
                real_err.write(f"error: {message}\n")
                real_err.flush()
            raise


@contextmanager
def backend_errors(rank: int) -> Iterator[None]:
    """Turn the distributed backend's RuntimeError into one LayerdecodeError line."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if not text.startswith(_BACKEND_MARKS):
            raise
        first = text.splitlines()[0]
        if "lost" in first or "closed" in first:
            hint = "another rank has died (see its error) or the network dropped"
        else:
            hint = "check the hostfile and that the ports are free (mlx.launch --starting-port)"
        raise LayerdecodeError(f"rank {rank}: {first}; {hint}") from None


def _to_array(data: bytes):
    import mlx.core as mx
    import numpy as np

    return mx.array(np.frombuffer(data, dtype=np.uint8))


def _to_bytes(array) -> bytes:
    import numpy as np

    return np.array(array).tobytes()


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _check_hostfile() -> bool:
    """Read mlx.launch's ring hostfile the way the backend will, with a one-line error;
    False when it is empty (``mlx.launch -n 1`` writes no peers)."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return True
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if not text.strip():
            return False
        hosts = json.loads(text)
    except OSError as error:
        raise ConfigError(f"hostfile {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise ConfigError(f"hostfile {path} is not valid JSON ({error})") from None
    good = isinstance(hosts, list) and all(
        isinstance(h, list) and h and all(isinstance(a, str) and ":" in a for a in h) for h in hosts
    )
    if not good or len(hosts) < 2:
        raise ConfigError(
            f"hostfile {path}: expected a list of at least two ranks, each a list of "
            '"ip:port" strings, e.g. [["10.0.0.1:5000"], ["10.0.0.2:5000"]]'
        )
    rank = os.environ.get("MLX_RANK", "0")
    if not rank.isdigit() or int(rank) >= len(hosts):
        raise ConfigError(f"MLX_RANK={rank} but hostfile {path} lists {len(hosts)} ranks")
    return True


def init(mode: str | None = None) -> ProcessGroup:
    """Join the job this process was launched in, or a single process when not launched.

    ``mode`` is ``"data"`` or ``"tensor"`` (default: ``$LAYERDECODE_DISTRIBUTED``, else
    ``"data"``); pipeline parallelism is refused.
    """
    mode = mode or os.environ.get(MODE_ENV) or "data"
    if mode == "pipeline":
        raise ConfigError(
            "pipeline parallelism is not supported: each rank would hold only some layers, "
            "so a strategy reading an early exit would need layers that live on another "
            "rank; use --distributed tensor to split a model"
        )
    if mode not in MODES:
        raise ConfigError(f"Unknown distributed mode {mode!r}; use one of: {', '.join(MODES)}")
    timeout = _timeout()
    if not launched():
        return ProcessGroup(mode=mode, timeout=timeout)
    if not _check_hostfile():
        return ProcessGroup(mode=mode, timeout=timeout)
    import mlx.core as mx

    rank = int(os.environ.get("MLX_RANK", "0") or 0)
    with backend_errors(rank):
        group = mx.distributed.init(strict=True)
    if group.size() == 1:
        return ProcessGroup(mode=mode, timeout=timeout)
    return ProcessGroup(group.rank(), group.size(), mode, timeout, group)
