"""Pictures (layerdecode.plots) of a hand-made lens result, and the shims at the old names."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from layerdecode import plots
from layerdecode.errors import ConfigError
from layerdecode.lens import LensResult


def _lens() -> LensResult:
    rng = np.random.default_rng(0)
    layers, positions = [0, 2, 3], 6
    top_ids = rng.integers(0, 9, size=(len(layers), positions))
    return LensResult(
        layers=layers,
        token_ids=list(range(positions)),
        tokens=["a", " b", "\n", "  ", "long token", "z"],
        top_ids=top_ids,
        probs=rng.uniform(0, 1, size=top_ids.shape).astype(np.float32),
        entropies=rng.uniform(0, 3, size=top_ids.shape).astype(np.float32),
        top_tokens=[[f"t{i}" for i in row] for row in top_ids],
        final_top_ids=top_ids[-1].copy(),
        num_layers=4,
        prompt_length=4,
        chosen_layers=np.array([-1, -1, -1, 0, 3, 2]),
    )


def test_plot_lens_and_html(tmp_path):
    import matplotlib.image as mpimg

    result = _lens()
    for color in ("entropy", "prob"):
        image = mpimg.imread(plots.plot_lens(result, tmp_path / f"{color}.png", color=color))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    with pytest.raises(ConfigError, match="Unknown colour"):
        plots.plot_lens(result, tmp_path / "x.png", color="rainbow")
    with pytest.raises(ConfigError, match="Cannot write"):
        plots.plot_lens(result, tmp_path / "missing" / "x.png")
    page = plots.lens_html(result, color="prob")
    assert page.count("<tr>") == 1 + len(result.layers)
    assert "t" in page and page.count("class='differs'") + page.count("class='chosen'") >= 1


def test_short_token():
    assert plots.short_token("hello world", 6) == "hello…"
    assert plots.short_token("\n") == "\\n"
    assert plots.short_token(" ab") == " ab"
    assert plots.short_token("  ") == "··"


def test_moved_names_are_gone_from_their_old_homes():
    # Nothing was released before they moved: no aliases are kept.
    for old, name in [
        ("layerdecode.lens", "plot_lens"),
        ("layerdecode.eval.stats", "render_summary"),
    ]:
        with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
            _ = getattr(importlib.import_module(old), name)


def test_computing_modules_import_no_drawing_library():
    import ast
    import inspect

    from layerdecode import lens
    from layerdecode.eval import stats

    for module in (lens, stats):
        tree = ast.parse(inspect.getsource(module))
        names = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not [n for n in names if n.split(".")[0] in ("matplotlib", "rich")]
