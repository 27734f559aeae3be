"""The lm-eval model ``layerdecode`` (layerdecode.harness) and ``layerdecode lm-eval``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from click.testing import CliRunner  # noqa: E402

from layerdecode.errors import ConfigError  # noqa: E402

# slow: lm-evaluation-harness runs, mlx_lm.evaluate and a real model
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Task data paths are relative to the repository root; nothing may reach the hub.
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _lm(tiny_model_dir, **args):
    from layerdecode.harness import LayerdecodeLM

    return LayerdecodeLM(model=str(tiny_model_dir), **args)


def _requests(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def _evaluate(model, model_args, tasks, **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import layerdecode.harness  # noqa: F401

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        **kwargs,
    )


# -- model_args -------------------------------------------------------------------------------


def test_importing_the_model_needs_no_torch():
    code = "import layerdecode.harness, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_model_args_split_settings_from_strategy_params():
    from lm_eval.utils import simple_parse_args_string

    from layerdecode.harness import parse_model_args

    values = simple_parse_args_string("model=m,strategy=dola,layers=2:4,relative_top=0.2")
    args = parse_model_args({**values, "batch_size": 3, "device": None})
    assert args.model == "m" and args.strategy == "dola" and args.batch_size == 3
    assert args.params == {"layers": [2, 4], "relative_top": 0.2}
    # A real list (lm-eval's bracket or JSON form) is taken as it is.
    assert parse_model_args({"strategy": "dola", "layers": [2, 4]}).params == {"layers": [2, 4]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": "confident", "windw": 8}, "Unknown model_args windw"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"masked_logprob": "low"}, "masked_logprob must be a number"),
        ({"strategy": "nope"}, "Unknown strategy or preset 'nope'"),
    ],
)
def test_bad_model_args_give_one_line(values, message):
    from layerdecode.harness import parse_model_args

    with pytest.raises(ConfigError) as err:
        parse_model_args(values)
    assert message in str(err.value) and "\n" not in str(err.value)
    if "windw" in values:
        assert "Did you mean 'window'" in str(err.value) and "strategy" in str(err.value)


# -- loglikelihood against numpy references ---------------------------------------------------


def _layer_logits(model, tokens):
    """Per position: raw-head logits of the embeddings and of every layer, and normed ones."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask

    inner = model.model
    assert "lm_head" not in model  # the tiny llama ties its head to the embeddings
    h = inner.embed_tokens(mx.array(tokens)[None])
    mask = create_attention_mask(h, None)
    hidden = [h]
    for layer in inner.layers:
        h = layer(h, mask, None)
        hidden.append(h)
    weight = np.array(inner.embed_tokens.weight, dtype=np.float64)
    raw = np.stack([np.array(x[0], dtype=np.float64) @ weight.T for x in hidden])
    normed = np.stack([np.array(inner.norm(x)[0], dtype=np.float64) @ weight.T for x in hidden[1:]])
    return raw, normed  # (layers + 1, T, V), (layers, T, V)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _entropy(logits):
    lp = _log_softmax(logits)
    return -(np.exp(lp) * lp).sum(axis=-1)


def _confident_reference(raw, normed, window, p):
    """Confident Decoding: walk down from the final layer while the entropy falls."""
    n = normed.shape[0]
    out = []
    for t in range(normed.shape[1]):
        entropy = [_entropy(normed[j, t]) for j in range(n)]
        j = n - 1
        while j > n - window and entropy[j - 1] < entropy[j]:
            j -= 1
        selected, final = np.exp(_log_softmax(normed[j, t])), np.exp(_log_softmax(normed[-1, t]))
        out.append(np.log(p * selected + (1 - p) * final))
    return np.stack(out)


def _dola_reference(raw, normed, hf_layers, relative_top=0.1):
    """DoLa: contrast the final layer with the most JS-divergent premature layer."""
    out = []
    for t in range(normed.shape[1]):
        final_lp = _log_softmax(normed[-1, t])
        best, best_js = None, -np.inf
        for layer in hf_layers:
            lp = _log_softmax(raw[layer, t])
            m = 0.5 * (np.exp(final_lp) + np.exp(lp))
            js = 0.5 * (np.mean(m * (np.log(m) - final_lp)) + np.mean(m * (np.log(m) - lp)))
            if js > best_js:
                best, best_js = lp, js
        contrast = final_lp - best
        keep = final_lp >= final_lp.max() + np.log(relative_top)
        scores = np.full_like(contrast, -np.inf)
        scores[keep] = _log_softmax(contrast[keep])
        out.append(scores)
    return np.stack(out)


def _expected(distributions, prefix_len, targets, masked=-1000.0):
    rows = [distributions[prefix_len - 1 + i, tok] for i, tok in enumerate(targets)]
    greedy = all(distributions[prefix_len - 1 + i].argmax() == tok for i, tok in enumerate(targets))
    return sum(masked if r == -np.inf else r for r in rows), greedy


@pytest.mark.parametrize(
    ("args", "reference"),
    [
        ({"strategy": "confident", "window": 4}, lambda r, n: _confident_reference(r, n, 4, 1.0)),
        (
            {"strategy": "confident", "window": 3, "p": 0.4},
            lambda r, n: _confident_reference(r, n, 3, 0.4),
        ),
        ({"strategy": "dola", "layers": "2:4"}, lambda r, n: _dola_reference(r, n, [2, 4])),
        ({"strategy": "dola"}, lambda r, n: _dola_reference(r, n, [3, 5])),
    ],
)
def test_loglikelihood_matches_numpy_reference(tiny_model_dir, args, reference):
    lm = _lm(tiny_model_dir, score_chunk=3, **args)
    context = "w7 w8 w9 w10"
    prefix = lm._encode(context)
    raw_all = {}

    def expect(continuation):
        tokens = lm._encode(context + continuation)
        raw, normed = _layer_logits(lm._model, tokens)
        raw_all[continuation] = reference(raw, normed)
        return _expected(raw_all[continuation], len(prefix), tokens[len(prefix) :])

    # The greedy continuation of the reference itself, then arbitrary ones.
    words = lm.tokenizer._tokenizer.convert_ids_to_tokens
    greedy_cont, tokens = "", list(prefix)
    for _ in range(4):
        raw, normed = _layer_logits(lm._model, tokens)
        nxt = int(reference(raw, normed)[-1].argmax())
        tokens.append(nxt)
        greedy_cont += " " + words(nxt)
    continuations = [greedy_cont, " w20 w30 w40 w50 w60", " w11"]
    got = lm.loglikelihood(_requests("loglikelihood", [(context, c) for c in continuations]))
    for continuation, (score, greedy) in zip(continuations, got, strict=True):
        want, want_greedy = expect(continuation)
        assert score == pytest.approx(want, rel=1e-4, abs=1e-3), continuation
        assert greedy == want_greedy, continuation
    assert got[0][1] is True
    # loglikelihood_rolling scores every token after the first with the same distributions.
    text = "w7 w8 w9 w10" + continuations[1]
    tokens = lm._encode(text)
    raw, normed = _layer_logits(lm._model, tokens)
    want, _ = _expected(reference(raw, normed), 1, tokens[1:])
    rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,), (context,)]))
    assert rolling[0] == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_dola_masked_tokens_score_the_floor(tiny_model_dir):
    lm_floor = _lm(tiny_model_dir, strategy="dola", layers="2:4")
    lm_inf = _lm(tiny_model_dir, strategy="dola", layers="2:4", masked_logprob="-inf")
    request = _requests("loglikelihood", [("w7 w8 w9 w10", " w20 w30 w40 w50 w60")])
    tokens = lm_floor._encode("w7 w8 w9 w10 w20 w30 w40 w50 w60")
    raw, normed = _layer_logits(lm_floor._model, tokens)
    dist = _dola_reference(raw, normed, [2, 4])
    masked = sum(dist[3 + i, t] == -np.inf for i, t in enumerate(tokens[4:]))
    assert masked > 0  # the case this test is about
    assert lm_floor.loglikelihood(request)[0][0] < -1000.0 * masked + 1
    assert lm_inf.loglikelihood(request)[0][0] == -np.inf


# -- generate_until -----------------------------------------------------------------------------


def test_generation_stops_at_until_inside_the_loop(tiny_model_dir):
    lm = _lm(tiny_model_dir, batch_size=2)
    contexts = ["w7 w8 w9", "w30 w31 w32 w33"]
    free = lm.generate_until(
        _requests("generate_until", [(c, {"until": ["zzz"], "max_gen_toks": 12}) for c in contexts])
    )
    assert lm.generation_counts == [12, 12]
    words = free[0].split()
    # The first generated word that does not occur in the text before it.
    k = next(
        i for i, w in enumerate(words) if i >= 2 and w not in " ".join(words[:i]) and len(w) > 1
    )
    stop = words[k]
    got = lm.generate_until(
        _requests("generate_until", [(c, {"until": [stop], "max_gen_toks": 12}) for c in contexts])
    )
    # Row 0 ended at the token that spelled the stop string: k + 1 tokens, not 12.
    assert lm.generation_counts[0] == k + 1
    assert got[0] == free[0][: free[0].find(stop)]
    row1 = free[1].find(stop)
    if row1 < 0:
        assert lm.generation_counts[1] == 12 and got[1] == free[1]
    else:
        assert lm.generation_counts[1] < 12 and got[1] == free[1][:row1]


# -- chat templates and the command line ------------------------------------------------------


def test_chat_template_flags_reach_the_prompt(tiny_model_dir):
    results = _evaluate(
        "layerdecode",
        f"model={tiny_model_dir}",
        ["layerdecode_mc_local"],
        limit=2,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        system_instruction="Be brief.",
    )
    sample = results["samples"]["layerdecode_mc_local"][0]
    context = sample["arguments"][0][0]
    assert context.startswith("<system> Be brief. <user> Question:")
    assert context.endswith("<assistant> ")
    assert results["results"]["layerdecode_mc_local"]["acc,none"] in (0.0, 0.5, 1.0)


def test_cli_help_and_a_tiny_run(tiny_model_dir, tmp_path):
    from layerdecode.cli import cli

    runner = CliRunner()
    shown = runner.invoke(cli, ["lm-eval", "--help"])
    assert shown.exit_code == 0 and "--model_args" in shown.output
    out = tmp_path / "out"
    result = runner.invoke(
        cli,
        [
            "lm-eval",
            "--model_args",
            f"model={tiny_model_dir},strategy=confident,window=3,batch_size=2",
            "--tasks",
            "layerdecode_mc_local",
            "--include_path",
            str(TASKS),
            "--limit",
            "2",
            "--output_path",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["config"]["model"] == "layerdecode"
    assert "acc,none" in data["results"]["layerdecode_mc_local"]


def test_cli_bad_model_args_and_missing_extra(tiny_model_dir, monkeypatch):
    from layerdecode.cli import cli

    runner = CliRunner()
    args = ["lm-eval", "--model_args", f"model={tiny_model_dir},windw=3"]
    bad = runner.invoke(
        cli, [*args, "--tasks", "layerdecode_mc_local", "--include_path", str(TASKS)]
    )
    assert bad.exit_code == 2
    assert "Unknown model_args windw" in bad.output
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)
    missing = runner.invoke(cli, ["lm-eval", "--tasks", "x"])
    assert missing.exit_code == 1
    assert 'pip install "layerdecode[lm-eval]"' in missing.output


# -- strategy=final equals mlx_lm.evaluate ----------------------------------------------------


def test_final_equals_mlx_lm_evaluate(smollm2):
    import mlx_lm.evaluate  # noqa: F401  (registers "mlxlm")

    from layerdecode.manifests import model_dir

    folder = model_dir("smollm2-135m-instruct", "float32")
    tasks = ["layerdecode_gsm_local", "layerdecode_mc_local"]
    common = "batch_size=4,max_tokens=24"
    kwargs = {"limit": 4, "num_fewshot": 0}  # short prompts keep mlx_lm.evaluate quick
    theirs = _evaluate("mlxlm", f"path_or_hf_repo={folder},{common}", tasks, **kwargs)
    ours = _evaluate("layerdecode", f"model={folder},strategy=final,{common}", tasks, **kwargs)
    for task in tasks:
        assert ours["results"][task] == theirs["results"][task]
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["resps"] == b["resps"]
            assert a["filtered_resps"] == b["filtered_resps"]
    gsm = [s["resps"][0][0] for s in ours["samples"]["layerdecode_gsm_local"]]
    assert any(text.strip() for text in gsm)
