"""What the wheel is declared to carry, and the one version. `.ci/package` builds the wheel."""

from __future__ import annotations

import ast
import inspect
import os
import re
from importlib import import_module, metadata
from pathlib import Path

import pytest

import layerdecode

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
HATCH = PYPROJECT["tool"]["hatch"]


def test_version_has_one_source():
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert HATCH["version"] == {"path": "layerdecode/__init__.py"}
    init = ast.parse((ROOT / "layerdecode" / "__init__.py").read_text(encoding="utf-8"))
    assigned = [
        node.value.value
        for node in init.body
        if isinstance(node, ast.Assign)
        and any(getattr(target, "id", None) == "__version__" for target in node.targets)
    ]
    assert assigned == [layerdecode.__version__]
    # An editable install records the version it was installed with: reinstall after a bump.
    assert metadata.version("layerdecode") == layerdecode.__version__


def test_version_is_what_cli_and_eval_records_show():
    from click.testing import CliRunner

    from layerdecode.cli import cli
    from layerdecode.eval.records import _version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"layerdecode, version {layerdecode.__version__}"
    assert _version() == layerdecode.__version__


@pytest.mark.parametrize("kind", ["strategies", "models"])
def test_presets_and_manifests_travel_in_the_wheel(kind):
    from layerdecode.resources import data_dir

    files = sorted((ROOT / kind).glob("*.yaml"))
    assert files, f"no {kind}/*.yaml files"
    # The wheel is built from the sdist, so the files must be in both.
    assert kind in HATCH["build"]["targets"]["sdist"]["include"]
    force_include = HATCH["build"]["targets"]["wheel"]["force-include"]
    assert force_include[kind] == f"layerdecode/_data/{kind}"
    # In this tree the package reads them from the top-level folder, in a wheel from _data.
    assert data_dir(kind) == ROOT / kind


def builtin_strategy_classes() -> dict[str, type]:
    from layerdecode.strategy import Strategy

    found = {}
    for path in sorted((ROOT / "layerdecode" / "strategies").glob("*.py")):
        module = import_module(f"layerdecode.strategies.{path.stem}")
        for obj in vars(module).values():
            defined_here = getattr(obj, "__module__", None) == module.__name__
            # A class without a name is a shared base (premature.py), not a strategy to register.
            named = getattr(obj, "name", "")
            if defined_here and inspect.isclass(obj) and issubclass(obj, Strategy) and named:
                found[f"{obj.__module__}:{obj.__qualname__}"] = obj
    return found


def test_every_builtin_strategy_has_an_entry_point():
    from layerdecode.registry import _BUILTIN_ENTRY_POINTS, ENTRY_POINT_GROUP

    declared = PYPROJECT["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert set(declared.values()) == set(builtin_strategy_classes())
    assert declared == _BUILTIN_ENTRY_POINTS  # the fallback for a tree that was never installed
    installed = {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert {name: installed.get(name) for name in declared} == declared


def test_readme_links_work_on_the_package_index():
    # The index shows the README without the repository: every relative link must be one that
    # the readme hook rewrites to the documentation site.
    hook = HATCH["metadata"]["hooks"]["fancy-pypi-readme"]
    text = (ROOT / hook["fragments"][0]["path"]).read_text(encoding="utf-8")
    for sub in hook["substitutions"]:
        text = re.sub(sub["pattern"], sub["replacement"], text)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    relative = [link for link in links if not link.startswith(("https://", "http://", "#"))]
    assert not relative, f"README links that break on the package index: {relative}"


def test_release_files_are_declared():
    assert "CHANGELOG.md" in HATCH["build"]["targets"]["sdist"]["include"]
    assert f"## {layerdecode.__version__} " in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert PYPROJECT["project"]["license"] == "MIT" and (ROOT / "LICENSE").is_file()


def test_ci_runs_the_package_check():
    script = ROOT / ".ci" / "package"
    assert os.access(script, os.X_OK)
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ".ci/package" in run, ".ci/run must end by running .ci/package"
