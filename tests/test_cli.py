"""The command line, end to end, on a tiny random llama saved as an mlx-lm directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from layerdecode.cli import cli
from layerdecode.cli import run as run_module

WORDS = ["<unk>", "<s>", "</s>", "<system>", "<user>", "<assistant>"]
WORDS += [f"w{i}" for i in range(150)]
WORDS += [
    "the",
    "capital",
    "of",
    "france",
    "is",
    "paris",
    "what",
    "answer",
    "briefly",
    "hello",
    "world",
    "a",
    "and",
    "to",
]


def build_tiny_model(path: Path) -> Path:
    """A 4-layer random llama plus a word-level tokenizer with a chat template."""
    from layerdecode.testing import save_tiny_model

    return save_tiny_model(path, words=WORDS, num_layers=4, intermediate_size=128, weight_scale=1.0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(autouse=True)
def loader(monkeypatch):
    """The real loader when it exists; else a stand-in that loads local mlx-lm directories."""
    try:
        import layerdecode.loading  # noqa: F401
    except ImportError:
        from layerdecode.errors import ModelError

        def load(name_or_path=None, *, dtype=None, progress=None):
            from mlx_lm import load as mlx_load

            if name_or_path is None or not Path(name_or_path).is_dir():
                raise ModelError(f"Model '{name_or_path}' not found.")
            return mlx_load(name_or_path)

        module = types.ModuleType("layerdecode.loading")
        module.load = load
        module.DEFAULT_MODEL = "smollm2-135m-instruct"
        monkeypatch.setitem(sys.modules, "layerdecode.loading", module)


def run(*args, input=None, env=None):
    return CliRunner().invoke(cli, list(args), input=input, env=env)


def run_json(*args, **kwargs):
    result = run(*args, "--json", **kwargs)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result, code: int, *needles: str):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------ help and version


@pytest.mark.parametrize(
    "path",
    [
        [],
        ["generate"],
        ["compare"],
        ["inspect"],
        ["strategies"],
        ["strategies", "list"],
        ["strategies", "show"],
        ["strategies", "validate"],
        ["models"],
        ["models", "list"],
        ["models", "pull"],
        ["models", "info"],
    ],
)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_everywhere(path, flag):
    result = run(*path, flag)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_help_documents_options():
    text = run("generate", "--help").output
    for option in (
        "--model",
        "LAYERDECODE_MODEL",
        "--dtype",
        "--strategy",
        "--param",
        "--prompt",
        "--system",
        "--raw",
        "--max-tokens",
        "--temp",
        "--top-p",
        "--min-p",
        "--top-k",
        "--seed",
        "--repetition-penalty",
        "--repetition-context-size",
        "--show-layers",
        "--json",
    ):
        assert option in text, option
    assert "--batch-size" in run("compare", "--help").output
    inspect_help = run("inspect", "--help").output
    for option in ("--layers", "--color", "--out", "--html"):
        assert option in inspect_help


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert "layerdecode" in result.output and "0." in result.output


@pytest.mark.slow  # another process
def test_help_is_instant():
    code = (
        "import sys; from layerdecode.cli import cli; "
        "assert 'mlx.core' not in sys.modules and 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ generate


def test_generate_json(tiny_model):
    data = run_json("generate", "--model", tiny_model, "--prompt", "hello world", "-n", "6")
    for key in (
        "text",
        "prompt_tokens",
        "tokens",
        "layers",
        "entropies",
        "strategy",
        "prompt_tps",
        "generation_tps",
        "peak_memory_gb",
        "num_layers",
        "finish_reason",
        "extras",
    ):
        assert key in data, key
    assert data["num_layers"] == 4
    assert len(data["tokens"]) == len(data["layers"]) == len(data["entropies"])
    assert 1 <= len(data["tokens"]) <= 6
    assert all(layer == 3 for layer in data["layers"])  # final = num_layers - 1
    assert data["strategy"]["name"] == "final" and data["strategy"]["params"] == {}
    # The chat template was applied: <user> hello world <assistant>
    assert data["prompt_tokens"] == [4, WORDS.index("hello"), WORDS.index("world"), 5]


def test_generate_raw_and_system(tiny_model):
    raw = run_json("generate", "-m", tiny_model, "-p", "hello world", "-n", "2", "--raw")
    assert WORDS.index("<user>") not in raw["prompt_tokens"]
    system = run_json("generate", "-m", tiny_model, "-p", "hi", "-n", "2", "--system", "the")
    assert system["prompt_tokens"][:2] == [WORDS.index("<system>"), WORDS.index("the")]


def test_generate_strategy_params_and_presets(tiny_model, tmp_path):
    data = run_json(
        "generate", "-m", tiny_model, "-p", "hello", "-n", "8", "--strategy", "fixed",
        "--param", "layer=1",
    )  # fmt: skip
    assert data["strategy"]["params"] == {"layer": 1}
    assert set(data["layers"]) == {1}
    data = run_json(
        "generate", "-m", tiny_model, "-p", "hello", "-n", "4", "-s", "confident",
        "-P", "window=3", "-P", "method=last-m2",
    )  # fmt: skip
    assert data["strategy"]["params"]["window"] == 3
    assert set(data["layers"]) == {1}
    preset = tmp_path / "mine.yaml"
    preset.write_text("name: mine\nstrategy: fixed\nparams: {layer: 2}\n")
    data = run_json("generate", "-m", tiny_model, "-p", "hello", "-n", "3", "-s", str(preset))
    assert set(data["layers"]) == {2}
    data = run_json("generate", "-m", tiny_model, "-p", "hello", "-n", "3", "-s", "dola")
    assert data["strategy"]["name"] == "dola"
    assert "premature_layer" in data["extras"]


def test_generate_streams_text_and_summary(tiny_model):
    result = run("generate", "-m", tiny_model, "-p", "hello", "-n", "5", "-s", "fixed")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # the text
    summary = result.stderr.strip().splitlines()[-1]
    for part in ("tokens", "tok/s", "non-final", "mean depth"):
        assert part in summary


def test_generate_show_layers(tiny_model):
    result = run(
        "generate", "-m", tiny_model, "-p", "hello", "-n", "6", "--show-layers",
        "-s", "confident", "-P", "window=4", "-P", "method=last-m2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "layers:" in result.stderr and "final (3)" in result.stderr
    assert "1 ×" in result.stderr


def test_generate_stdin_env_and_seed(tiny_model):
    env = {"LAYERDECODE_MODEL": tiny_model}
    args = ["generate", "-p", "-", "-n", "6", "--temp", "1.5", "--seed", "3", "--json"]
    first = run(*args, input="hello world", env=env)
    second = run(*args, input="hello world", env=env)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["tokens"] == json.loads(second.stdout)["tokens"]
    sampling = [
        "--top-p", "0.9", "--min-p", "0.05", "--top-k", "20",
        "--repetition-penalty", "1.3", "--repetition-context-size", "8",
    ]  # fmt: skip
    assert run(*args, *sampling, input="hello", env=env).exit_code == 0


def test_generate_ctrl_c_keeps_output(tiny_model, monkeypatch):
    from layerdecode import generation

    real = generation.stream_generate

    def interrupted(*args, **kwargs):
        for i, response in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield response

    monkeypatch.setattr(generation, "stream_generate", interrupted)
    result = run("generate", "-m", tiny_model, "-p", "hello", "-n", "10")
    assert result.exit_code == 130
    assert result.stdout.strip()
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    data = json.loads(run("generate", "-m", tiny_model, "-p", "hello", "-n", "10", "--json").stdout)
    assert data["finish_reason"] == "interrupted" and len(data["tokens"]) == 2


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["-s", "confidnet"], 2, ["Unknown strategy or preset 'confidnet'", "confident"]),
        (["-P", "window"], 2, ["Malformed --param 'window'"]),
        (["-P", "=3"], 2, ["Malformed --param"]),
        (["-P", "window=[1,"], 2, ["not valid YAML"]),
        (["-P", "window={a: 1}"], 2, ["Malformed --param"]),
        (["-s", "confident", "-P", "window=abc"], 2, ["window"]),
        (["-s", "confident", "-P", "nope=1"], 2, ["unknown parameter 'nope'"]),
        (["-n", "0"], 2, ["--max-tokens"]),
        (["-n", "-3"], 2, ["--max-tokens"]),
        (["--temp", "-1"], 2, ["--temp"]),
        (["--top-p", "1.5"], 2, ["--top-p"]),
        (["--bogus"], 2, ["--bogus"]),
        (["-s", "missing.yaml"], 2, ["missing.yaml"]),
        (["--system", "x", "--raw"], 2, ["--system"]),
    ],
)
def test_generate_bad_input(tiny_model, args, code, needles):
    result = run("generate", "-m", tiny_model, "-p", "hello", *args)
    assert_one_line_error(result, code, *needles)


def test_empty_prompt(tiny_model):
    assert_one_line_error(run("generate", "-m", tiny_model, "-p", "  "), 2, "empty")
    assert_one_line_error(run("generate", "-m", tiny_model, "-p", "-", input=""), 2, "empty")


def test_unreadable_yaml(tiny_model, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert_one_line_error(run("generate", "-m", tiny_model, "-p", "x", "-s", str(bad)), 2, "YAML")


def test_missing_model(tmp_path):
    result = run("generate", "-m", str(tmp_path / "nowhere"), "-p", "hello")
    assert_one_line_error(result, 1)


def test_depth_error_is_usage(tiny_model):
    result = run("generate", "-m", tiny_model, "-p", "hello", "-s", "fixed", "-P", "layer=9")
    assert_one_line_error(result, 2)


def test_unexpected_error_and_debug(tiny_model, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(run_module, "run_generate", boom)
    result = run("generate", "-m", tiny_model, "-p", "hello")
    assert_one_line_error(result, 1, "RuntimeError: kaboom", "--debug")
    result = run("--debug", "generate", "-m", tiny_model, "-p", "hello")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "kaboom" in result.stderr


# ------------------------------------------------------------------ compare


def test_compare_table(tiny_model):
    result = run(
        "compare", "-m", tiny_model, "-s", "final,fixed,confident", "-p", "hello world",
        "-n", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for word in ("final", "fixed", "confident", "diverges at", "tok/s", "non-final"):
        assert word in result.stdout


def test_compare_json_and_prompts_file(tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n\n{"prompt": "what is the capital"}\n')
    low = tmp_path / "low.yaml"
    low.write_text("name: low\nstrategy: fixed\nparams: {layer: 0}\n")
    data = run_json(
        "compare", "-m", tiny_model, "-s", f"final,{low}", "--prompts", str(prompts),
        "-p", "a and", "-n", "4", "--batch-size", "2",
    )  # fmt: skip
    assert data["strategies"] == ["final", "low"]
    assert [p["prompt"] for p in data["prompts"]] == ["a and", "hello", "what is the capital"]
    for entry in data["prompts"]:
        first, second = entry["results"]
        assert first["diverges_at"] is None
        assert second["layers"] and set(second["layers"]) == {0}
        assert "non_final_share" in second and "generation_tps" in second
    text = run(
        "compare", "-m", tiny_model, "-s", "final,fixed", "--prompts", str(prompts), "-n", "3"
    ).stdout
    assert "summary" in text and "identical" in text


@pytest.mark.parametrize(
    ("content", "needle"),
    [("not json\n", "line 1"), ('{"text": "x"}\n', "'prompt'"), ("\n", "no prompts")],
)
def test_compare_bad_prompts_file(tiny_model, tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    result = run("compare", "-m", tiny_model, "--prompts", str(path))
    assert_one_line_error(result, 2, needle)


def test_compare_bad_strategy(tiny_model):
    result = run("compare", "-m", tiny_model, "-s", "final,dolla", "-p", "x")
    assert_one_line_error(result, 2, "dola")


# ------------------------------------------------------------------ inspect


def test_inspect_png_html_json(tiny_model, tmp_path):
    import matplotlib.image as mpimg

    png, page = tmp_path / "lens.png", tmp_path / "lens.html"
    result = run(
        "inspect", "-m", tiny_model, "-p", "hello world", "-n", "5", "-s", "confident",
        "-P", "window=3", "--out", str(png), "--html", str(page),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "generated tokens" in result.stdout and "wrote" in result.stderr
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 600
    assert page.read_text().count("<tr>") == 1 + 4
    data = run_json(
        "inspect", "-m", tiny_model, "-p", "hello world", "-n", "3", "--layers", "1:3",
        "--color", "prob", "--out", str(png),
    )  # fmt: skip
    assert data["layers"] == [1, 2]
    assert len(data["top_ids"]) == 2 and len(data["top_ids"][0]) == len(data["token_ids"])
    assert data["chosen_layers"][data["prompt_length"] - 1] == 3


@pytest.mark.parametrize(
    ("layers", "needle"), [("a:b", "Malformed --layers"), ("7", "out of range"), ("9:", "no layer")]
)
def test_inspect_bad_layers(tiny_model, tmp_path, layers, needle):
    result = run(
        "inspect", "-m", tiny_model, "-p", "hi", "--layers", layers, "-o", str(tmp_path / "x.png")
    )
    assert_one_line_error(result, 2, needle)


def test_inspect_bad_color(tiny_model):
    assert_one_line_error(run("inspect", "-m", tiny_model, "-p", "x", "--color", "red"), 2)


# ------------------------------------------------------------------ strategies


def test_strategies_list():
    result = run("strategies", "list")
    assert result.exit_code == 0, result.output
    for name in ("final", "fixed", "dola", "confident", "logit-lens-m4", "preset", "built-in"):
        assert name in result.stdout
    rows = run_json("strategies", "list")
    kinds = {(r["name"], r["kind"]) for r in rows}
    assert ("confident", "built-in") in kinds and ("confident-half", "preset") in kinds
    assert all(r["source"] for r in rows)


def test_strategies_show():
    result = run("strategies", "show", "confident")
    assert result.exit_code == 0, result.output
    for word in ("window", "method", "trough", "default", "preset"):
        assert word in result.stdout
    data = run_json("strategies", "show", "fixed")
    assert data["params"][0]["name"] == "layer" and data["params"][0]["default"] == -1
    assert data["params"][0]["type"] == "int"
    data = run_json("strategies", "show", "dola-low")
    assert data["preset"]["params"] == {"layers": "low"}
    assert data["preset"]["generation"] == {"repetition_penalty": 1.2}
    assert_one_line_error(run("strategies", "show", "dolla"), 2, "Did you mean")


def test_strategies_validate(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("name: good\nstrategy: confident\nparams: {window: 4}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstrategy: confident\nparams: {window: four}\n")
    result = run("strategies", "validate", str(good))
    assert result.exit_code == 0 and "ok" in result.stdout
    result = run("strategies", "validate", str(good), str(bad))
    assert result.exit_code == 2
    assert "ok" in result.stdout and "window" in result.stderr
    assert_one_line_error(run("strategies", "validate", str(tmp_path / "none.yaml")), 2)


# ------------------------------------------------------------------ models


@pytest.fixture
def manifests(monkeypatch):
    calls = {}

    def manifest_rows():
        return [{"name": "tiny", "description": "a tiny model", "layers": 4, "cached": False}]

    def pull(name, *, dtype=None, progress=None, force=False):
        from layerdecode.errors import ModelError

        if name != "tiny":
            raise ModelError(f"Unknown model '{name}'.")
        calls["pull"] = (name, dtype, force)
        if progress:
            progress("downloading tiny")
        return Path("/cache/tiny")

    def model_info(name):
        return {"name": name, "layers": 4, "files": ["a", "b"]}

    try:
        import layerdecode.manifests as module
    except ImportError:
        module = types.ModuleType("layerdecode.manifests")
        monkeypatch.setitem(sys.modules, "layerdecode.manifests", module)
    for fn in (manifest_rows, pull, model_info):
        monkeypatch.setattr(module, fn.__name__, fn, raising=False)
    return calls


def test_models_commands(manifests):
    result = run("models", "list")
    assert result.exit_code == 0 and "tiny" in result.stdout
    assert run_json("models", "list")[0]["name"] == "tiny"
    result = run("models", "pull", "tiny", "--dtype", "float16", "--force")
    assert result.exit_code == 0, result.output
    assert "/cache/tiny" in result.stdout and "downloading tiny" in result.stderr
    assert manifests["pull"] == ("tiny", "float16", True)
    assert_one_line_error(run("models", "pull", "nope"), 1, "Unknown model")
    assert run_json("models", "info", "tiny")["layers"] == 4
    assert "layers" in run("models", "info", "tiny").stdout


# ------------------------------------------------------------------ the real model


@pytest.mark.real_model
def test_real_model_generate():
    exe = shutil.which("layerdecode")
    if exe is None:
        pytest.skip("the layerdecode executable is not installed")
    out = subprocess.run(
        [
            exe,
            "generate",
            "--prompt",
            "What is the capital of France? Answer briefly.",
            "--max-tokens",
            "12",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "Paris" in data["text"]
    assert data["num_layers"] == 30 and set(data["layers"]) == {29}


def made_result(tokens: list[int], layers: list[int], **fields):
    """A GenerationResult of a 4-layer model written by hand (``fields`` override)."""
    from layerdecode.generation import GenerationResult

    values = dict(text="", prompt_tokens=[1], entropies=[0.0] * len(tokens), num_layers=4)
    values |= dict(strategy={"name": "final", "params": {}}, finish_reason="length")
    values |= dict(prompt_tps=1.0, generation_tps=1.0, peak_memory_gb=0.0)
    return GenerationResult(**{**values, "tokens": tokens, "layers": layers, **fields})


def test_tables_show_text_literally():
    from rich.console import Console

    from layerdecode.render import compare_table

    result = made_result([7, 8], [3, 2], text="[bold]x[/bold] [1, 2]", entropies=[0.1, 0.2])
    console = Console(width=120, record=True)
    console.print(compare_table("p", ["a", "b"], [result, result]))
    text = console.export_text()
    assert "[bold]x[/bold] [1, 2]" in text and "identical" in text and "50%" in text


def test_strategies_show_preset_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nstrategy: fixed\nparams: {layer: 2}\n")
    data = run_json("strategies", "show", str(path))
    assert data["strategy"] == "fixed" and data["preset"]["params"] == {"layer": 2}


def _results_file(path):
    from layerdecode.eval.records import ResultsStore

    from .test_eval_records import make_config, make_record

    with ResultsStore.open(path, make_config()) as store:
        for index in range(6):
            store.append(make_record(index, "final"))
            dola = make_record(index, "dola")
            if index in (0, 2):  # final wrong on even items; dola right on 0 and 2
                dola = dola.model_copy(update={"correct": True, "extracted": "4"})
            store.append(dola)
        store.append(make_record(6, "final"))  # a chunk that dola has not reached yet
    return path


def test_report_summarises_a_results_file(tmp_path):
    path = _results_file(tmp_path / "run.jsonl")
    result = run("report", str(path))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "gsm8k · tiny-model · 6 items every strategy answered" in text
    assert "2/0/4" in text  # dola won 2, lost 0, tied 4 against final
    assert "left out 1 items that only some strategies answered" in text
    assert "2 items where the strategies disagree" in text
    assert "4 (right)" in text and "3 (wrong)" in text

    data = run_json("report", str(path), "--all-items")
    assert data["items_left_out"] == [] and data["n_items"] == 7
    assert [s["n"] for s in data["strategies"]] == [7, 6]
    assert data["comparisons"][0]["wins"] == 2 and data["comparisons"][0]["answers_differ"] == 2
    assert [d["item_id"] for d in data["disagreements"]] == ["0", "2"]
    assert data["config"]["task"] == "gsm8k"

    data = run_json("report", str(path), "-s", "dola")
    assert [s["name"] for s in data["strategies"]] == ["dola"] and data["n_items"] == 6
    plot = tmp_path / "report.png"
    assert run("report", str(path), "--plot", str(plot)).exit_code == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_report_bad_input(tmp_path):
    path = _results_file(tmp_path / "run.jsonl")
    cases = [
        (["report", str(path), "-s", "final,nope"], "has no strategy 'nope'; it holds final, dola"),
        (["report", str(tmp_path / "missing.jsonl")], "not found"),
        (["report", str(path), "--disagreements", "-1"], "-1 is not in the range x>=0"),
    ]
    (tmp_path / "other.jsonl").write_text('{"hello": 1}\n')
    cases.append((["report", str(tmp_path / "other.jsonl")], "not a layerdecode eval results file"))
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


# ------------------------------------------------------------------ the package's shape


def test_stop_ends_the_output_before_the_stop_text(tiny_model):
    # Seeded sampling gives varied words; a word from the middle of that output is the stop.
    args = ["generate", "-m", tiny_model, "-p", "hello", "-n", "10", "--temp", "1", "--seed", "0"]
    full = run_json(*args)["text"]
    words = full.split()
    assert len(words) >= 5, full
    stop = " " + words[len(words) // 2]
    data = run_json(*args, "--stop", stop)
    assert data["finish_reason"] == "stop" and data["stop_sequence"] == stop
    assert data["text"] == full[: full.index(stop)]
    streamed = run(*args, "--stop", stop, "--stop", "never said")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.strip() == data["text"].strip()
    assert "finish stop" in streamed.stderr


def test_generation_flags_come_from_option_fields():
    from layerdecode.options import option_fields

    fields = {field.flag: field for field in option_fields()}
    for command in ("generate", "compare", "inspect", "eval"):
        text = " ".join(run(command, "--help").output.split())
        for flag, field in fields.items():
            assert flag in text, (command, flag)
            if flag != "--max-tokens":  # the CLI's own default and range, per command
                assert " ".join(field.help.split()) in text, (command, flag)
    assert "--stop TEXT" in run("generate", "--help").output


def test_strategies_list_says_which_presets_shadow_their_strategy():
    rows = {row["name"]: row for row in run_json("strategies", "list") if row["kind"] == "preset"}
    assert rows["dola"]["shadows"] and not rows["dola-low"]["shadows"]
    text = " ".join(run("strategies", "list").stdout.split())
    assert "-s dola" in text and "mean the preset" in text


@pytest.mark.slow  # another process
def test_help_imports_no_mlx():
    code = (
        "import sys; from layerdecode.cli import cli\n"
        "for args in (['--help'], ['generate', '--help'], ['eval', '--help']):\n"
        "    try:\n"
        "        cli(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'matplotlib')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_cli_modules_use_only_the_public_api():
    # Faces call the public API: no mx arrays, adapters, taps, decode loops or schema internals.
    import ast

    import layerdecode.cli

    forbidden_modules = ("mlx", "mlx_lm", "pydantic", "pydantic_core")
    forbidden_modules += tuple(f"layerdecode.{m}" for m in ("adapters", "taps", "engine", "view"))
    forbidden_names = {"mx", "get_adapter", "model_fields", "_as_dict", "Engine", "logit_lens"}
    folder = Path(layerdecode.cli.__file__).parent
    sources = sorted(folder.glob("*.py"))
    assert {p.stem for p in sources} >= {"__init__", "options", "run", "evaluate", "catalog"}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules, names = [], []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "layerdecode.cli" if node.level == 1 else "layerdecode"
                module = node.module or ""
                modules = [f"{base}.{module}".rstrip(".") if node.level else module]
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            for module in modules:
                assert not module.startswith(forbidden_modules), (path.name, module)
            assert not forbidden_names.intersection(names), (path.name, names)


@pytest.mark.slow  # another process
def test_a_reader_that_stops_early_gets_no_error(tmp_path):
    # `layerdecode strategies list | grep -q x`: the reader is gone before the table is written.
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "layerdecode.cli", "strategies", "list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    # click's own handling of a closed pipe: exit 1 without a word (no traceback).
    assert done.returncode == 1
    assert done.stderr == ""
