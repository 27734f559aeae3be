"""Model manifests: schema, lookup, and pulling wheels into the cache (with local fakes)."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from layerdecode import manifests
from layerdecode.errors import ModelError
from tests.gguf_files import write_tiny_gguf, write_wheel


def test_shipped_manifests_are_valid():
    names = [m.name for m in manifests.list_manifests()]
    assert "smollm2-135m-instruct" in names and "gemma-3-270m" in names
    smol = manifests.get_manifest("smollm2-135m-instruct")
    assert [s.kind for s in smol.sources] == ["hub", "pypi_wheel"]
    gemma = manifests.get_manifest("gemma-3-270m")
    assert gemma.sources[0].kind == "pypi_parts" and len(gemma.sources[0].files) == 4


def test_unknown_name_suggests():
    with pytest.raises(ModelError) as error:
        manifests.get_manifest("smollm2-135m-instrct")
    message = str(error.value)
    assert "Unknown model 'smollm2-135m-instrct'" in message
    assert "Did you mean 'smollm2-135m-instruct'?" in message and "gemma-3-270m" in message


@pytest.fixture
def fake_world(tmp_path, monkeypatch):
    """A manifest folder, a --find-links folder with one wheel, and an empty cache."""
    models, links, home = tmp_path / "models", tmp_path / "links", tmp_path / "home"
    for folder in (models, links):
        folder.mkdir()
    gguf_bytes = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    wheel = write_wheel(links, "fake-tiny-model", "1.0", {"fake_tiny_model/tiny.gguf": gguf_bytes})
    monkeypatch.setattr(manifests, "data_dir", lambda kind: models)
    monkeypatch.setenv("LAYERDECODE_HOME", str(home))
    monkeypatch.setenv("LAYERDECODE_FIND_LINKS", str(links))

    def write_manifest(sha256, **extra):
        source = {"kind": "pypi_wheel", "package": "fake-tiny-model", "version": "1.0"}
        source |= {"sha256": sha256, "file": "fake_tiny_model/tiny.gguf"}
        data = {"name": "tiny", "description": "test", "licence": "MIT"}
        data |= {"architecture": "llama", "sources": [source], **extra}
        (models / "tiny.yaml").write_text(yaml.safe_dump(data))

    return write_manifest, hashlib.sha256(wheel.read_bytes()).hexdigest(), home


def test_manifest_schema_is_strict(fake_world):
    write_manifest, sha, _ = fake_world
    write_manifest(sha, colour="blue")
    with pytest.raises(ModelError, match="colour"):
        manifests.get_manifest("tiny")
    write_manifest("abc")
    with pytest.raises(ModelError, match="sha256"):
        manifests.get_manifest("tiny")
    write_manifest("abc", colour="blue")  # every problem, on one line
    with pytest.raises(ModelError) as error:
        manifests.get_manifest("tiny")
    message = str(error.value)
    assert message.startswith("Invalid model manifest tiny.yaml: ") and "\n" not in message
    assert "unknown key 'colour'" in message and "sha256" in message


def test_manifest_rows_are_json_with_cached(fake_world, monkeypatch):
    write_manifest, sha, home = fake_world
    write_manifest(sha)
    rows = manifests.manifest_rows()
    assert json.loads(json.dumps(rows)) == rows
    assert [(r["name"], r["cached"]) for r in rows] == [("tiny", False)]
    assert rows[0]["sources"][0]["kind"] == "pypi_wheel"
    manifests.pull("tiny", dtype="float32")
    assert manifests.manifest_rows()[0]["cached"] is True
    info = manifests.model_info(home / "models" / "tiny" / "float32")
    assert json.loads(json.dumps(info)) == info

    def broken(name):
        raise OSError("unreadable cache")

    monkeypatch.setattr(manifests, "model_info", broken)  # a broken cache hides nothing
    assert [(r["name"], r["cached"]) for r in manifests.manifest_rows()] == [("tiny", False)]


def test_pull_converts_into_the_cache(fake_world):
    write_manifest, sha, home = fake_world
    write_manifest(sha)
    messages = []
    path = manifests.pull("tiny", dtype="float32", progress=messages.append)
    assert path == home / "models" / "tiny" / "float32" and (path / "config.json").is_file()
    assert (home / "models" / "tiny" / "model.gguf").is_file()
    assert any("Downloading fake-tiny-model==1.0" in m for m in messages)
    assert manifests.pull("tiny", dtype="float32") == path  # cached: no download
    info = manifests.model_info("tiny")
    assert info["cached"] and info["num_layers"] == 1 and info["dtype"] == "float32"
    assert not [p for p in (home / "models" / "tiny").iterdir() if p.name.startswith(".")]


def test_hash_mismatch_caches_nothing(fake_world):
    write_manifest, _, home = fake_world
    write_manifest("0" * 64)
    with pytest.raises(ModelError) as error:
        manifests.pull("tiny", dtype="float32")
    assert "sha256 mismatch" in str(error.value) and "\n" not in str(error.value)
    leftovers = list((home / "models" / "tiny").iterdir())
    assert leftovers == []


def test_missing_package_is_one_line(fake_world, monkeypatch):
    write_manifest, sha, _ = fake_world
    write_manifest(sha)
    monkeypatch.setenv("LAYERDECODE_FIND_LINKS", str(fake_world[2].parent / "nowhere"))
    with pytest.raises(ModelError) as error:
        manifests.pull("tiny", dtype="float32")
    assert "fake-tiny-model==1.0" in str(error.value) and "\n" not in str(error.value)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERDECODE_HOME", str(tmp_path))
    assert manifests.cache_dir() == tmp_path
    monkeypatch.delenv("LAYERDECODE_HOME")
    assert manifests.cache_dir().name == "layerdecode"
