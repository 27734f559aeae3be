"""Helpers for testing strategies and models with layerdecode, for plugin authors and our tests.

Three kinds of check, from cheapest to most complete:

- :func:`select_on` and :func:`view_over` run a strategy's ``select`` on per-layer logits you
  choose (plain numpy arrays), so it can be compared with a few lines of numpy.
- :func:`tiny_model`, :func:`tiny_tokenizer` and :func:`save_tiny_model` build small
  random-weight mlx-lm models of every supported architecture, with no download, to run a
  strategy inside the real generation loop or the command line.
- :func:`check_final_matches_mlx_lm` checks that layerdecode decodes a model exactly as mlx-lm
  does, token for token.

:func:`fresh_registry` keeps strategies registered by a test from leaking into the next one.

Example:
    ```python
    import numpy as np
    from layerdecode.registry import get_strategy
    from layerdecode.testing import select_on

    logits = np.random.default_rng(0).normal(size=(6, 4, 50)).astype(np.float32)
    decision = select_on(get_strategy("fixed", layer=2), logits)
    assert np.array(decision.layers).tolist() == [2, 2, 2, 2]
    ```
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .adapters import Adapter
from .strategy import Decision, ModelFacts, Strategy
from .taps import Capture
from .view import Exit, LayerView

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

__all__ = [
    "TINY_ARCHITECTURES",
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_WORDS",
    "check_final_matches_mlx_lm",
    "fresh_registry",
    "model_types",
    "refused_architectures",
    "save_tiny_model",
    "select_on",
    "tiny_configs",
    "tiny_model",
    "tiny_tokenizer",
    "unbuildable_architectures",
    "view_over",
]

# -- a LayerView over given logits -----------------------------------------------------------


def _identity(h: mx.array) -> mx.array:
    return h


def _as_mx(array: np.ndarray | mx.array) -> mx.array:
    return array if isinstance(array, mx.array) else mx.array(np.asarray(array))


def view_over(
    layer_logits: np.ndarray | mx.array,
    *,
    embeddings: np.ndarray | mx.array | None = None,
    exits: Sequence[Exit] = (),
    tied: bool = True,
    norm: Callable[[mx.array], mx.array] | None = None,
) -> LayerView:
    """A :class:`~layerdecode.view.LayerView` whose layers' hidden states are the given logits.

    The view's output head is the identity, so decoding layer ``i`` gives back
    ``layer_logits[i]``, and the model's own output is the last layer's logits.

    Args:
        layer_logits: per-layer logits ``(layers, batch, vocab)``, numpy or mx.
        embeddings: ``(batch, vocab)`` "logits" of the embedding output, for strategies that
            read :data:`~layerdecode.view.EMBEDDINGS` (DoLa does); ``None`` leaves it out.
        exits: the exits to decode, usually ``strategy.exits()`` after ``prepare``.
        tied: what the view's adapter reports as ``tied_embeddings``.
        norm: the "final norm" applied to exits declared with ``norm=True``; the identity
            when ``None``, which makes ``norm=True`` and ``norm=False`` exits equal.

    Returns:
        The view of one decoding step over ``batch`` rows.
    """
    logits = _as_mx(layer_logits)
    num_layers = logits.shape[0]
    adapter = Adapter(
        model_type="test",
        layers=[None] * num_layers,
        norm=norm or _identity,
        head=_identity,
        transform=None,
        tied_embeddings=tied,
    )
    capture = Capture(num_layers)
    # Captured hidden states are (batch, positions, hidden): one position per step here.
    capture.outputs = [logits[i][:, None, :] for i in range(num_layers)]
    if embeddings is not None:
        capture.embeddings = _as_mx(embeddings)[:, None, :]
    return LayerView(adapter, capture, logits[-1], exits)


def select_on(
    strategy: Strategy,
    layer_logits: np.ndarray | mx.array,
    *,
    embeddings: np.ndarray | mx.array | None = None,
    tied: bool = True,
) -> Decision:
    """Run one step of ``strategy`` on per-layer logits and return its evaluated decision.

    The strategy is prepared for a model with ``layers`` decoder layers, then its ``select``
    gets a :func:`view_over` the logits with the exits it declared.

    Args:
        strategy: the strategy to run, e.g. ``get_strategy("confident", window=4)``.
        layer_logits: per-layer logits ``(layers, batch, vocab)``, numpy or mx.
        embeddings: ``(batch, vocab)`` logits of the embedding output (see :func:`view_over`).
        tied: passed to the strategy as ``ModelFacts.tied_embeddings`` and to the view.

    Returns:
        The :class:`~layerdecode.strategy.Decision`, with every array evaluated.

    Example:
        ```python
        decision = select_on(get_strategy("final"), logits)
        np.testing.assert_array_equal(np.array(decision.logits), logits[-1])
        ```
    """
    num_layers = int(layer_logits.shape[0])
    strategy.prepare(ModelFacts(num_layers, tied, "test"))
    view = view_over(layer_logits, embeddings=embeddings, exits=strategy.exits(), tied=tied)
    view.states = [strategy.new_state() for _ in range(view.batch_size)]
    decision = strategy.select(view)
    mx.eval(decision.logits, decision.layers, decision.entropy, *decision.extras.values())
    return decision


# -- tiny random-weight models ---------------------------------------------------------------

_TINY_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=6,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=211,
)

TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "mistral": ("llama", dict(tie_word_embeddings=False)),
    "smollm3": ("smollm3", dict(tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_experts_per_tok=2,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        ),
    ),
    "qwen3": (
        "qwen3",
        dict(max_position_embeddings=512, head_dim=16, tie_word_embeddings=True, rope_theta=1e4),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=32,
            head_dim=16,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            max_position_embeddings=512,
            norm_topk_prob=True,
        ),
    ),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "phi3": ("phi3", dict()),
    "olmo2": ("olmo2", dict()),
    "starcoder2": ("starcoder2", dict(norm_epsilon=1e-5)),
    "gemma": ("gemma", dict(head_dim=16)),
    "gemma2": ("gemma2", dict(head_dim=16, final_logit_softcapping=30.0)),
    "gemma3_text": (
        "gemma3_text",
        dict(head_dim=16, sliding_window=4, sliding_window_pattern=3, query_pre_attn_scalar=16),
    ),
    "cohere": ("cohere", dict(logit_scale=0.25, layer_norm_eps=1e-5)),
    "granite": (
        "granite",
        dict(
            logits_scaling=4.0,
            attention_multiplier=0.25,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            max_position_embeddings=512,
            attention_bias=False,
            mlp_bias=False,
            rope_theta=10000.0,
        ),
    ),
}
"""Tiny model name -> (mlx-lm module under ``mlx_lm.models``, extra ``ModelArgs`` fields).

One entry per architecture layerdecode supports, plus ``llama-untied`` (a separate head).
Every model has 6 layers of width 64 and a vocabulary of 211 tokens unless told otherwise.
"""


ARCHITECTURES_FILE = Path(__file__).with_name("tiny_architectures.json")
"""Tiny ``ModelArgs`` configurations for every mlx-lm architecture that builds without
weights, and the reason for each one that does not."""


def tiny_configs() -> dict[str, dict[str, Any]]:
    """mlx-lm architecture module -> a tiny config (its ``config.json`` fields: vocabulary of
    211 words, width 64, 4 to 8 layers with every kind of layer the architecture mixes)."""
    return {name: dict(entry) for name, entry in _architectures()["buildable"].items()}


def refused_architectures() -> dict[str, str]:
    """mlx-lm architecture module -> why layerdecode refuses to decode its layers (the model
    builds and runs in mlx-lm, but its layers' outputs are not a hidden state to decode)."""
    return dict(_architectures()["refused"])


def unbuildable_architectures() -> dict[str, str]:
    """mlx-lm architecture module -> why no tiny random model of it can be built."""
    return dict(_architectures()["unbuildable"])


def model_types() -> list[str]:
    """The model architectures the installed mlx-lm ships (modules with ``Model`` and
    ``ModelArgs``; building blocks such as ``cache`` or ``rope_utils`` are left out)."""
    import pkgutil

    import mlx_lm.models

    found = []
    for info in pkgutil.iter_modules(mlx_lm.models.__path__):
        try:
            module = importlib.import_module(f"mlx_lm.models.{info.name}")
        except (Exception, SystemExit):  # noqa: BLE001  (optional imports missing: olmo exits)
            found.append(info.name)
            continue
        if hasattr(module, "Model") and hasattr(module, "ModelArgs"):
            found.append(info.name)
    return sorted(found)


@functools.cache
def _architectures() -> dict[str, Any]:
    import json

    return json.loads(ARCHITECTURES_FILE.read_text(encoding="utf-8"))


def _tiny_from_config(arch: str, model_args: dict[str, Any]) -> nn.Module:
    import copy

    module = importlib.import_module(f"mlx_lm.models.{arch}")
    config = copy.deepcopy(tiny_configs()[arch])
    config.update(model_args)
    # Multimodal wrappers: the overrides are the text model's.
    if isinstance(config.get("text_config"), dict):
        config["text_config"].update(model_args)
    return module.Model(module.ModelArgs.from_dict(config))


def tiny_model(
    arch: str = "llama",
    *,
    seed: int = 0,
    num_layers: int | None = None,
    weight_scale: float = 2.0,
    **model_args: Any,
) -> nn.Module:
    """A small random-weight mlx-lm model, built from ``ModelArgs`` with no download.

    The same arguments give the same weights, so tests can rely on the model's outputs.

    Args:
        arch: a key of :data:`TINY_ARCHITECTURES`, or any mlx-lm architecture module with
            a config in :func:`tiny_configs` (``"qwen3_5"``, ``"gpt_oss"``...).
        seed: seeds MLX's random state before the weights are drawn.
        num_layers: decoder layers (default 6; for :func:`tiny_configs` models, their
            config's, and only where the config has ``num_hidden_layers`` at the top).
        weight_scale: factor on every weight matrix after the default initialisation; the
            default 2.0 makes the layers disagree, so that strategies have a choice to make.
        model_args: further ``ModelArgs`` fields (``vocab_size``, ``intermediate_size``...)
            that override the defaults.

    Returns:
        The evaluated model, in float32.

    Raises:
        KeyError: ``arch`` is neither in :data:`TINY_ARCHITECTURES` nor in
            :func:`tiny_configs`.
    """
    if arch not in TINY_ARCHITECTURES and arch not in tiny_configs():
        raise KeyError(
            f"Unknown tiny architecture '{arch}'. Known: {', '.join(TINY_ARCHITECTURES)}, "
            f"and the mlx-lm architectures of tiny_configs()."
        )
    if arch not in TINY_ARCHITECTURES:
        if num_layers is not None:
            model_args = {"num_hidden_layers": num_layers, **model_args}
        mx.random.seed(seed)
        model = _tiny_from_config(arch, model_args)
        return _finish(model, weight_scale)
    module_name, extra = TINY_ARCHITECTURES[arch]
    module = importlib.import_module(f"mlx_lm.models.{module_name}")
    fields = set(module.ModelArgs.__dataclass_fields__)
    args = {k: v for k, v in _TINY_DEFAULTS.items() if k in fields}
    args.update(extra)
    if num_layers is not None:
        args["num_hidden_layers"] = num_layers
    args.update(model_args)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs(model_type=arch.split("-")[0], **args))
    if arch == "gemma3_text":
        # Tied head, as the released Gemma 3 checkpoints are.
        model.sanitize({})
    return _finish(model, weight_scale)


def _finish(model: nn.Module, weight_scale: float) -> nn.Module:
    from mlx.utils import tree_flatten, tree_unflatten

    # A weight matrix that starts at zero (talkie's head) would make every layer decode to
    # the same logits: draw it at random like the others.
    zeros = [
        (k, mx.random.normal(p.shape, dtype=p.dtype) * 0.05)
        for k, p in tree_flatten(model.parameters())
        if p.ndim == 2 and mx.issubdtype(p.dtype, mx.floating) and not mx.any(p).item()
    ]
    if zeros:
        model.update(tree_unflatten(zeros))
    if weight_scale != 1.0:
        from mlx.utils import tree_map

        def scale(p):
            return p * weight_scale if p.ndim == 2 and mx.issubdtype(p.dtype, mx.floating) else p

        model.update(tree_map(scale, model.parameters()))
    mx.eval(model.parameters())
    return model


TINY_SPECIAL_WORDS = ("<unk>", "<s>", "</s>", "<user>", "<assistant>")
"""The first words of :func:`tiny_tokenizer`'s default vocabulary: unknown, BOS, EOS, roles."""

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
"""``<role> content`` per message, then ``<assistant>`` when a reply is to be generated."""


def tiny_tokenizer(
    vocab_size: int = 211, *, words: Sequence[str] | None = None
) -> TokenizerWrapper:
    """A word-level tokenizer with a chat template, wrapped as mlx-lm wraps one.

    Text is split on whitespace and each word is one token, so prompts are easy to write
    (``"w7 w8 w9"``) and their ids easy to predict.

    Args:
        vocab_size: size of the default vocabulary: :data:`TINY_SPECIAL_WORDS`, then
            ``w5``, ``w6``... up to ``vocab_size`` words.
        words: the vocabulary instead, in id order (repeats are dropped). It must contain
            ``<unk>``, ``<s>`` and ``</s>``, and ``<role>`` for each chat role used.

    Returns:
        An ``mlx_lm.tokenizer_utils.TokenizerWrapper``; ``</s>`` is its end of sequence.

    Raises:
        ValueError: ``words`` lacks one of the special tokens.
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if words is None:
        vocabulary = list(TINY_SPECIAL_WORDS)
        vocabulary += [f"w{i}" for i in range(len(vocabulary), vocab_size)]
    else:
        vocabulary = list(dict.fromkeys(words))
        missing = [w for w in ("<unk>", "<s>", "</s>") if w not in vocabulary]
        if missing:
            raise ValueError(f"words must include the special tokens {', '.join(missing)}")
    vocab = {word: i for i, word in enumerate(vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return TokenizerWrapper(fast)


def save_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    words: Sequence[str] | None = None,
    vocab_size: int = 211,
    num_layers: int | None = None,
    seed: int = 0,
    weight_scale: float = 2.0,
    **model_args: Any,
) -> Path:
    """Save a :func:`tiny_model` and its :func:`tiny_tokenizer` as an mlx-lm model directory.

    The directory holds the weights, ``config.json`` and the tokenizer files with the chat
    template, so ``layerdecode.load(path)``, ``mlx_lm.load(path)`` and
    ``layerdecode generate --model PATH`` all accept it. (transformers gives a saved
    ``qwen2`` model Qwen2's own tokenizer class, which does not read this vocabulary: use
    ``qwen2_moe`` or ``qwen3`` for a saved Qwen model.)

    Args:
        path: the directory to write (created if needed).
        arch: a key of :data:`TINY_ARCHITECTURES`.
        words: the tokenizer's vocabulary (see :func:`tiny_tokenizer`); the model's
            vocabulary size follows it.
        vocab_size: the vocabulary size when ``words`` is not given.
        num_layers, seed, weight_scale, model_args: as for :func:`tiny_model`.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    tokenizer = tiny_tokenizer(vocab_size, words=words)
    model = tiny_model(
        arch,
        seed=seed,
        num_layers=num_layers,
        weight_scale=weight_scale,
        vocab_size=len(tokenizer.get_vocab()),
        **model_args,
    )
    path.mkdir(parents=True, exist_ok=True)
    tokenizer._tokenizer.save_pretrained(path)
    save_model(path, model)
    config = {k: v for k, v in vars(model.args).items() if v is not None}
    config.setdefault("max_position_embeddings", 512)
    # mlx-lm reads the end of sequence from config.json: keep the tokenizer's, not the ids
    # of the architecture's released checkpoints that some ModelArgs default to.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key, None)
    # transformers validates config.json strictly, and gemma2 wants an int where mlx-lm's
    # default is 144.0.
    if isinstance(config.get("query_pre_attn_scalar"), float):
        config["query_pre_attn_scalar"] = int(config["query_pre_attn_scalar"])
    save_config(config, path / "config.json")
    return path


# -- layerdecode against mlx-lm --------------------------------------------------------------


def check_final_matches_mlx_lm(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 16,
    strategy: str | Strategy = "final",
    params: dict[str, Any] | None = None,
) -> list[int]:
    """Check that layerdecode decodes ``model`` token for token as mlx-lm's greedy loop does.

    ``layerdecode.generate`` with ``strategy`` must give exactly the tokens of
    ``mlx_lm.generate.generate_step`` (greedy), up to the tokenizer's end of sequence, and
    report the final layer for each. A new model, or a strategy whose params should leave
    only the final layer, is then known to work with layerdecode.

    Args:
        model, tokenizer: as returned by ``layerdecode.load`` or ``mlx_lm.load``.
        prompt: text (encoded as ``layerdecode.generate`` encodes it) or token ids.
        max_tokens: tokens to generate.
        strategy, params: what ``layerdecode.generate`` decodes with; it should decode from
            the final layer (the default ``"final"`` does).

    Returns:
        The tokens both produced (the end-of-sequence token left out).

    Raises:
        AssertionError: the tokens differ (the message names the first position that does)
            or a token was not decoded from the final layer.
    """
    from mlx_lm.generate import generate_step
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from . import generate

    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    result = generate(
        model, tokenizer, prompt, strategy=strategy, params=params, max_tokens=max_tokens
    )
    # The prompt ids layerdecode used, so text prompts are encoded once, the same way.
    prompt_ids = mx.array(result.prompt_tokens, dtype=mx.uint32)
    expected: list[int] = []
    for token, _ in generate_step(prompt_ids, model, max_tokens=max_tokens):
        token = int(token)
        if token in tokenizer.eos_token_ids:
            break
        expected.append(token)
    got = list(result.tokens)
    if got != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )

        def token_at(tokens: list[int]) -> str:
            return str(tokens[at]) if at < len(tokens) else "nothing (end of sequence)"

        raise AssertionError(
            f"layerdecode ({result.strategy['name']}) and mlx-lm differ at generated token {at}: "
            f"layerdecode gave {token_at(got)}, mlx-lm {token_at(expected)}. "
            f"Both gave {expected[:at]} before it; layerdecode {got}, mlx-lm {expected}."
        )
    final = result.num_layers - 1
    other = [(i, layer) for i, layer in enumerate(result.layers) if layer != final]
    if other:
        i, layer = other[0]
        raise AssertionError(
            f"layerdecode ({result.strategy['name']}) gave mlx-lm's tokens, but token {i} "
            f"came from layer {layer}, not the final layer {final}."
        )
    return got


# -- the strategy registry -------------------------------------------------------------------


@contextmanager
def fresh_registry() -> Iterator[None]:
    """Run the ``with`` block on fresh strategy and preset registries; forget what it registers.

    Entry points (the built-in strategies, installed plugins) are discovered again on first
    use inside the block and after it, so a test can register strategies without leaking them.

    Example:
        ```python
        with fresh_registry():
            register_strategy("mine")(MyStrategy)
            ...
        assert "mine" not in list_strategies()
        ```
    """
    from . import config, registry

    registry.reset_strategy_registry()
    config.reset_preset_registry()
    try:
        yield
    finally:
        registry.reset_strategy_registry()
        config.reset_preset_registry()
