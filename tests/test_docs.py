"""The Python in docs/quickstart.md and docs/plugins.md runs, or a named test mirrors it.

A fenced python block is either executed here, in order, on a tiny random model (the page's
``layerdecode.load(...)`` calls return it), or preceded by
``<!-- mirrored-by: tests/test_x.py::test_name -->``, and that test must exist. A block
preceded by ``<!-- excerpt-of: path -->`` must also appear verbatim in that file, and a
``--8<--`` snippet must point at an existing file.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import layerdecode
from layerdecode.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["docs/quickstart.md", "docs/plugins.md"]

FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.M | re.S)
COMMENT = re.compile(r"<!--\s*(?P<key>[\w-]+):\s*(?P<value>.*?)\s*-->")
SNIPPET = re.compile(r'^--8<--\s+"(?P<path>[^"]+)"\s*$')


def blocks(page: str) -> list[dict]:
    """Fenced blocks of a page with the marker comments right before each one."""
    text = (ROOT / page).read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        markers: dict[str, list[str]] = {}
        before = text[: match.start()].rstrip("\n").splitlines()
        while before and COMMENT.fullmatch(before[-1].strip()):
            comment = COMMENT.fullmatch(before.pop().strip())
            markers.setdefault(comment["key"], []).append(comment["value"])
        line = text.count("\n", 0, match.start()) + 1
        found.append(dict(lang=match["lang"], body=match["body"], markers=markers, line=line))
    return found


def python_blocks(page: str) -> list[dict]:
    return [b for b in blocks(page) if b["lang"] == "python"]


def test_has_blocks():
    for page in PAGES:
        assert python_blocks(page), f"{page} has no python blocks"


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    source = ROOT / path
    if not source.is_file() or not name:
        return False
    tree = ast.parse(source.read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        for node in tree.body
    )


@pytest.mark.parametrize("page", PAGES)
def test_markers_point_at_real_tests_and_files(page):
    for block in blocks(page):
        where = f"{page}:{block['line']}"
        for ref in block["markers"].get("mirrored-by", []):
            assert _test_exists(ref), f"{where}: mirrored-by names a missing test {ref}"
        for path in block["markers"].get("excerpt-of", []):
            source = (ROOT / path).read_text(encoding="utf-8")
            assert _normalise(block["body"]) in _normalise(source), (
                f"{where}: the block is no longer an excerpt of {path}"
            )
        for line in block["body"].splitlines():
            snippet = SNIPPET.match(line.strip())
            if snippet:
                assert (ROOT / snippet["path"]).is_file(), f"{where}: missing {snippet['path']}"


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def test_unmirrored_python_blocks_of_the_plugin_tutorial_are_none():
    # The tutorial's blocks need a plugin class and a real package; tests mirror them all.
    unmirrored = [b["line"] for b in python_blocks("docs/plugins.md") if not b["markers"]]
    assert not unmirrored, f"docs/plugins.md blocks at lines {unmirrored} need mirrored-by"


@pytest.mark.parametrize("page", PAGES)
def test_unmirrored_python_blocks_run(page, monkeypatch):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr(layerdecode, "load", lambda *a, **k: (model, tokenizer), raising=False)
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        if "mirrored-by" in block["markers"]:
            continue
        code = compile(block["body"], f"{page}:{block['line']}", "exec")
        exec(code, namespace)


@pytest.mark.slow  # another process
def test_documented_generate_is_the_function_even_after_its_module_is_imported():
    # The pages call layerdecode.generate(...); importing the submodules (as layerdecode.cli
    # and layerdecode.batch do) must not replace the function with a module of that name. A
    # fresh interpreter, since this process may have imported either first.
    import subprocess
    import sys

    code = (
        "import layerdecode.generation, layerdecode.batch, layerdecode.cli, layerdecode; "
        "print(callable(layerdecode.generate), callable(layerdecode.stream_generate))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "True True", done.stderr


SHELL_LANGS = ("bash", "sh", "shell", "console")
PLUGIN_DIR = ROOT / "docs" / "examples" / "layerdecode-min-entropy"


def shell_commands(page: str) -> list[tuple[int, str]]:
    """The ``layerdecode ...`` lines of a page's shell blocks (installs are left out)."""
    found = []
    for block in blocks(page):
        if block["lang"] not in SHELL_LANGS:
            continue
        for offset, line in enumerate(block["body"].splitlines(), start=1):
            if line.strip().startswith("layerdecode "):
                found.append((block["line"] + offset, line.strip()))
    return found


@pytest.mark.parametrize("page", PAGES)
def test_shell_commands_run(page, tmp_path, monkeypatch):
    # Each documented command runs, on a tiny model and with a short budget, in a folder
    # holding the files the page names (a few GSM8K items, the plugin's preset).
    import shlex
    import shutil
    from importlib import metadata

    from click.testing import CliRunner

    from layerdecode.cli import cli

    from .test_cli import build_tiny_model

    commands = shell_commands(page)
    assert commands, f"{page} has no layerdecode commands"
    plugin_installed = any(
        ep.name == "min-entropy" for ep in metadata.entry_points(group="layerdecode.strategies")
    )
    model_dir = build_tiny_model(tmp_path / "tiny")
    work = tmp_path / "work"
    work.mkdir()
    gsm8k = ROOT.parent / "shared" / "data" / "gsm8k_train_500.jsonl"
    if not gsm8k.exists():
        gsm8k = ROOT / "tests" / "data" / "arithmetic.jsonl"
    lines = gsm8k.read_text().splitlines()[:3]
    (work / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(PLUGIN_DIR / "min-entropy-4.yaml", work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("LAYERDECODE_MODEL", str(model_dir))
    runner = CliRunner()
    for line, command in commands:
        args = shlex.split(command)[1:]
        if "min-entropy" in command and not plugin_installed:
            continue  # CI installs the example plugin; see docs/plugins.md
        if args[0] in ("generate", "compare", "inspect", "eval"):
            args += ["--max-tokens", "4"]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, f"{page}:{line}: {command}\n{result.output}"
