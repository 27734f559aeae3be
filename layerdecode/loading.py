"""From a name or a path to ``(model, tokenizer)``.

``load`` accepts, in this order of precedence:

1. nothing: the default model, ``DEFAULT_MODEL``;
2. the name of a shipped model manifest (``layerdecode models list``): fetched and converted into
   the cache on first use (see ``layerdecode.manifests``), then loaded from there;
3. a ``.gguf`` file: imported in memory (see ``layerdecode.gguf``);
4. a local mlx-lm model directory;
5. anything else that looks like ``owner/repo``: handed to ``mlx_lm.load`` (Hugging Face Hub).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerdecode.dtypes import DTYPES, check_dtype, default_dtype
from layerdecode.errors import ModelError

__all__ = ["DEFAULT_MODEL", "DTYPES", "cast_model", "default_dtype", "load"]

# The one spelling of the default model's name: import it rather than repeat it.
DEFAULT_MODEL = "smollm2-135m-instruct"


def load(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
    group: Any = None,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer as ``(model, mlx_lm TokenizerWrapper)``.

    ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"quantized"`` (keep quantised
    weights where the source has them; float sources stay float) or None for
    ``default_dtype()``. ``progress`` receives one-line messages while a model is fetched.
    ``group``: a :class:`layerdecode.distributed.ProcessGroup` in ``tensor`` mode loads
    this rank's slice of every layer with mlx-lm's ``sharded_load``; other groups load
    the whole model.
    """
    dtype = check_dtype(dtype)
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if group is not None and group.tensor:
        return _load_sharded(name, dtype, group, progress)

    # Lazy: manifests pulls in pydantic, and a plain path should not pay for it.
    from layerdecode import manifests

    if manifests.is_manifest_name(name):
        folder = manifests.pull(name, dtype=dtype, progress=progress)
        converted = folder == manifests.model_dir(name, dtype)
        return _load_folder(folder, None if converted else dtype)

    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        from layerdecode.gguf import load_gguf

        return load_gguf(path, dtype=dtype)
    if path.is_dir():
        return _load_folder(path, dtype)
    if _looks_like_repo_id(name):
        return _load_folder(name, dtype)
    manifests.get_manifest(name)  # raises the "Unknown model ... Did you mean" error
    raise AssertionError("unreachable")


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _load_folder(path: str | Path, dtype: str | None):
    """``mlx_lm.load`` on a local directory or Hub repo, then cast to ``dtype`` if given."""
    from mlx_lm.utils import load as mlx_load

    try:
        model, tokenizer = mlx_load(str(path))
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"Could not load the mlx-lm model {path}: {reason}") from None
    if dtype is not None:
        model = cast_model(model, dtype)
    return model, tokenizer


def _load_sharded(name: str, dtype: str, group: Any, progress: Callable[[str], None] | None):
    """This rank's tensor-parallel slice of a manifest model, a local folder or a Hub repo."""
    from mlx_lm.utils import sharded_load

    from layerdecode import manifests

    source: str | Path = name
    cast = dtype
    if manifests.is_manifest_name(name):
        source = manifests.pull(name, dtype=dtype, progress=progress)
        cast = None if source == manifests.model_dir(name, dtype) else dtype
    elif Path(name).expanduser().is_file() or name.lower().endswith(".gguf"):
        raise ModelError(
            f"{name}: a .gguf file cannot be split across ranks; convert it to an mlx-lm "
            "folder first (mlx_lm.convert) and pass the folder"
        )
    elif Path(name).expanduser().is_dir():
        source = Path(name).expanduser()
    elif not _looks_like_repo_id(name):
        manifests.get_manifest(name)  # raises the "Unknown model ... Did you mean" error
    try:
        model, tokenizer = sharded_load(str(source), tensor_group=group.group)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"Could not split {name} across {group.size} ranks: {reason}") from None
    _check_split(model, name, group.size)
    if cast is not None and cast != "quantized":
        if any("Quantized" in type(m).__name__ for _, m in model.named_modules()):
            raise ModelError(
                f"{name} is quantised and cannot be converted to {cast} once split; "
                "convert it first (mlx_lm.convert --dtype) or pass --dtype quantized"
            )
        model = cast_model(model, cast)
    return model, tokenizer


def _check_split(model: Any, name: str, ranks: int) -> None:
    """mlx-lm divides heads by the rank count without checking; a remainder breaks attention."""
    args = getattr(model, "args", None)
    for key in ("num_attention_heads", "num_key_value_heads"):
        count = getattr(args, key, None)
        if isinstance(count, int) and count % ranks:
            raise ModelError(
                f"{name} has {count} {key.replace('num_', '').replace('_', ' ')}, which "
                f"{ranks} ranks cannot split evenly; use a number of ranks that divides it, "
                "or --distributed data"
            )


def cast_model(model, dtype: str):
    """Dequantise and cast ``model`` to a float ``dtype``; ``"quantized"`` leaves it as is."""
    import mlx.core as mx
    import mlx.nn as nn

    if dtype == "quantized":
        return model
    quantised = any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    )
    if quantised:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model
