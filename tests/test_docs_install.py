"""Install commands a newcomer copies from the README and docs/ work today.

layerdecode is not on the package index yet, so every ``pip install`` that names the
``layerdecode`` distribution (rather than a checkout path such as ``.`` or a wheel file) must be
marked as a command for after the first release: inside a fenced block preceded by
``<!-- after-release -->``, or in a paragraph that says "after the first release" or that
layerdecode "has not been released".
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

MARKER = "<!-- after-release -->"
SAYS_SO = re.compile(r"after\s+the\s+first\s+release|has\s+not\s+been\s+released", re.I)
FENCE = re.compile(r"^```[^\n]*\n(?P<body>.*?)^```\s*$", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
PIP = re.compile(r"\bpip3?\s+install\b(?P<args>[^;&|#\n]*)")


def index_installs(command: str) -> list[str]:
    """The requirements of ``pip install`` commands in ``command`` that name the layerdecode
    distribution on the package index (not a path, a wheel file or another package)."""
    found = []
    for match in PIP.finditer(command):
        try:
            words = shlex.split(match["args"])
        except ValueError:
            words = match["args"].split()
        for word in words:
            name = re.split(r"[\[<>=!~ ;]", word, maxsplit=1)[0]
            if name.lower() == "layerdecode":
                found.append(word)
    return found


def unmarked(text: str) -> list[tuple[int, str]]:
    """(line, requirement) of every unmarked index install in a page's markdown."""
    problems = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        marked = bool(before) and before[-1].strip() == MARKER
        for requirement in index_installs(match["body"]):
            if not marked:
                problems.append((text.count("\n", 0, match.start()) + 1, requirement))
    # Inline code outside fenced blocks (blanked out, lines kept), judged by its paragraph.
    prose = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)
    position = 0
    for paragraph in re.split(r"\n\s*\n", prose):
        start = prose.index(paragraph, position)
        position = start + len(paragraph)
        for span in INLINE.finditer(paragraph):
            for requirement in index_installs(span[1]):
                if not SAYS_SO.search(paragraph):
                    problems.append((prose.count("\n", 0, start + span.start()) + 1, requirement))
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_index_installs_are_marked(page):
    problems = unmarked(page.read_text(encoding="utf-8"))
    assert not problems, (
        f"{page.relative_to(ROOT)}: install from the package index before the first release "
        f"(use a checkout path such as '.[extra]', or mark it {MARKER}): {problems}"
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ('pip install "layerdecode[cpu]"', ["layerdecode[cpu]"]),
        ("pip install layerdecode", ["layerdecode"]),
        ('pip install "layerdecode" "mlx[cuda13]"', ["layerdecode"]),
        ("python -m pip install -U layerdecode==0.1.0", ["layerdecode==0.1.0"]),
        ('pip install ".[cpu]"', []),
        ('pip install -e ".[cpu,dev]" ./docs/examples/layerdecode-min-entropy', []),
        ('pip install "dist/layerdecode-VERSION-py3-none-any.whl[cpu]"', []),
        ("pip install layerdecode-min-entropy", []),
    ],
)
def test_index_installs_are_recognised(command, expected):
    assert index_installs(command) == expected


def test_an_unmarked_block_and_span_are_found():
    page = "Try it:\n\n```bash\npip install layerdecode\n```\n\nOr `pip install layerdecode`.\n"
    assert unmarked(page) == [(3, "layerdecode"), (7, "layerdecode")]
    marked = f"Later:\n\n{MARKER}\n```bash\npip install layerdecode\n```\n"
    assert unmarked(marked) == []
    said = "After the first release, `pip install layerdecode`\nwill do.\n"
    assert unmarked(said) == []


def _pip_steps(commands: list[str]) -> list[str]:
    """The pip invocations of a command sequence, spelled alike (``python -m pip`` is
    ``pip``; ``-q`` and the ``docs`` extra left out)."""
    steps = []
    for command in commands:
        command = command.strip().replace("python -m pip", "pip").replace(" -q", "")
        if command.startswith("pip "):
            steps.append(command.replace(",docs", ""))
    return steps


def test_the_readme_test_command_installs_as_ci_does():
    # CI runs the README's tests after its own install lines: the two must not drift apart
    # (a step CI has and the README lacks, such as upgrading pip, hides a failing command).
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Run the tests") :]
    command = FENCE.search(section)["body"].strip()
    assert command.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert _pip_steps(command.split("&&")) == _pip_steps(ci)
    assert "python -m pytest -q" in ci
