"""Structured output: response_format checked, and rows that answer in JSON (a schema's).

The real-model tests decode SmolLM2-135M-Instruct under a grammar with several strategies
and temperatures, one row at a time and many rows of one engine at once, and check every
answer against its schema.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from layerdecode import ConfigError, Engine, GenerationOptions, Plan, generate, resolve_strategy
from layerdecode.prompts import build_prompt
from layerdecode.structured import (
    GrammarProcessor,
    check_response_format,
    response_format_processor,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"enum": ["France", "Italy", "Spain", "Other"]},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "country", "sunny"],
    "additionalProperties": False,
}
PRIMES = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}


def json_schema(name, schema, **more):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, **more}}


def matches(value, schema) -> bool:
    """``value`` follows one of this file's schemas (enough of JSON Schema for them)."""
    kind = schema.get("type")
    if "enum" in schema:
        return value in schema["enum"]
    if kind == "object":
        props = schema.get("properties", {})
        return (
            isinstance(value, dict)
            and all(k in value for k in schema.get("required", ()))
            and (schema.get("additionalProperties", True) or set(value) <= set(props))
            and all(matches(value[k], props[k]) for k in value if k in props)
        )
    if kind == "array":
        return (
            isinstance(value, list)
            and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
            and all(matches(v, schema["items"]) for v in value)
        )
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema.get("minimum", value) <= value <= schema.get("maximum", value)
        )
    if kind == "boolean":
        return isinstance(value, bool)
    raise AssertionError(f"no check for {schema}")


def test_matches_checks_what_it_says():
    assert matches({"name": "Ann", "age": 3}, PERSON)
    assert not matches({"name": "Ann"}, PERSON)
    assert not matches({"name": "Ann", "age": 3.5}, PERSON)
    assert not matches({"name": "Ann", "age": 151}, PERSON)
    assert not matches({"name": "Ann", "age": 3, "x": 1}, PERSON)
    assert not matches([2, 3, 5, 7, 11], PRIMES)
    assert not matches({"city": "Rome", "country": "Peru", "sunny": True}, CITY)


# -- checking response_format ----------------------------------------------------------------


def test_text_is_no_constraint():
    assert check_response_format(None) is None
    assert check_response_format({"type": "text"}) is None


def test_json_object_and_json_schema_compile():
    found = check_response_format({"type": "json_object"})
    assert (found.type, found.schema) == ("json_object", {"type": "object"})
    found = check_response_format(json_schema("person", PERSON, strict=True, description="x"))
    assert (found.type, found.name, found.strict, found.schema) == (
        "json_schema",
        "person",
        True,
        PERSON,
    )
    assert found.grammar


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("json", "must be an object"),
        ({"type": "jsn_object"}, "'jsn_object' is not supported. Did you mean 'json_object'"),
        ({}, "None is not supported"),
        ({"type": "json_object", "schema": {}}, "unknown key 'schema'"),
        ({"type": "json_object", "json_schema": {}}, 'only read with "type": "json_schema"'),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "name must be 1-64"),
        (json_schema("a b", PERSON), "name must be 1-64"),
        (json_schema("p", None), "must be a JSON Schema object"),
        (json_schema("p", "object"), "must be a JSON Schema object, e.g."),
        (json_schema("p", PERSON, strict="yes"), "strict must be true or false"),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schemas": PERSON}},
            "unknown key 'schemas'. Did you mean 'schema'",
        ),
        (json_schema("p", {"type": "strin"}), "not supported: Invalid type: strin"),
        (json_schema("p", {"not": {"type": "string"}}), 'Unimplemented keys: ["not"]'),
        (json_schema("p", {"$ref": "#/defs/x"}), "Pointer '/defs/x' does not exist"),
        (json_schema("p", {"type": "string", "pattern": "(["}), "regex parse error"),
        (
            json_schema("p", {"allOf": [{"type": "string"}, {"type": "integer"}]}),
            "Unsatisfiable schema",
        ),
    ],
)
def test_bad_response_formats_are_one_line(value, words):
    with pytest.raises(ConfigError) as info:
        check_response_format(value)
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_strict_false_ignores_unimplemented_keywords():
    lenient = check_response_format(json_schema("p", {"type": "string", "not": {}}, strict=False))
    assert lenient is not None and lenient.strict is False
    with pytest.raises(ConfigError, match='with "strict": false they are ignored'):
        check_response_format(json_schema("p", {"type": "string", "not": {}}))


def test_missing_library_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'layerdecode\[structured\]'"):
        check_response_format({"type": "json_object"})


# -- the processor on its own ----------------------------------------------------------------


def allowed_ids(processor, history, width):
    out = processor(mx.array(history, dtype=mx.int32), mx.zeros((1, width)))
    return set(np.nonzero(np.array(out[0]) > -np.inf)[0].tolist())


@pytest.mark.real_model
def test_end_of_sequence_exactly_when_the_grammar_accepts(smollm2):
    _, tok = smollm2
    eos = set(tok.eos_token_ids)
    processor = response_format_processor(tok, json_schema("primes", PRIMES))
    width = len(tok._tokenizer)
    history = [1, 2, 3]  # a prompt
    assert not allowed_ids(processor, history, width) & eos
    for token in tok.encode("[2, 3", add_special_tokens=False):
        history.append(token)
        assert not allowed_ids(processor, history, width) & eos
        assert not processor.accepting
    history += tok.encode("]", add_special_tokens=False)
    assert allowed_ids(processor, history, width) == eos  # nothing may follow the array
    assert processor.accepting and processor.error is None
    history.append(min(eos))  # the step built before the row ended reads its end again
    assert allowed_ids(processor, history, width) == eos
    assert processor.error is None


@pytest.mark.real_model
def test_the_mask_is_as_wide_as_the_logits(smollm2):
    _, tok = smollm2
    vocab = len(tok._tokenizer)
    processor = response_format_processor(tok, {"type": "json_object"})
    wide = processor(mx.array([1], dtype=mx.int32), mx.zeros((1, vocab + 64), dtype=mx.bfloat16))
    assert wide.shape == (1, vocab + 64) and wide.dtype == mx.bfloat16
    assert np.all(np.array(wide[0, vocab:].astype(mx.float32)) == -np.inf)  # padded ids
    brace = tok.encode("{", add_special_tokens=False)[0]
    assert float(wide[0, brace].astype(mx.float32)) == 0.0
    narrow = GrammarProcessor(tok, check_response_format({"type": "json_object"}).grammar)
    assert narrow(mx.array([1], dtype=mx.int32), mx.zeros((1, vocab - 8))).shape == (1, vocab - 8)


@pytest.mark.real_model
def test_a_strategy_that_cut_every_allowed_token_still_answers(smollm2):
    _, tok = smollm2
    processor = response_format_processor(tok, {"type": "json_object"})
    from mlx_lm.sample_utils import make_logits_processors

    brace = tok.encode("{", add_special_tokens=False)[0]
    history = mx.array([1, brace], dtype=mx.int32)
    logits = mx.full((1, len(tok._tokenizer)), -mx.inf)  # e.g. DoLa's plausibility cut
    out = processor(history, logits)
    # DoLa's preset penalises repeats after the grammar: the brace was seen, still it wins.
    (penalty,) = make_logits_processors(repetition_penalty=1.2)
    out = penalty(history, out)
    assert int(mx.argmax(out, axis=-1).item()) == brace  # the one token allowed first
    assert float(mx.max(out).item()) == 0.0


@pytest.mark.real_model
def test_one_processor_per_row(smollm2):
    _, tok = smollm2
    processor = response_format_processor(tok, {"type": "json_object"})
    processor(mx.array([1, 2, 3], dtype=mx.int32), mx.zeros((1, 8)))
    with pytest.raises(RuntimeError, match="one per row"):
        processor(mx.array([1], dtype=mx.int32), mx.zeros((1, 8)))


@pytest.fixture(scope="module")
def think_tokenizer(smollm2, tmp_path_factory):
    """SmolLM2's tokenizer with one-token <think> and </think> (mlx-lm finds them)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("think-tokenizer")
    smollm2[1]._tokenizer.save_pretrained(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    hf.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    hf.save_pretrained(folder)
    return load_tokenizer(folder)


@pytest.mark.real_model
def test_a_thinking_model_reasons_before_the_grammar_holds(think_tokenizer):
    tok = think_tokenizer
    start, end = tok.think_start_id, tok.think_end_id
    eos, width = set(tok.eos_token_ids), len(tok._tokenizer)
    brace = tok.encode("{", add_special_tokens=False)[0]
    answer = tok.encode('{"a": 1}', add_special_tokens=False)
    processor = response_format_processor(tok, {"type": "json_object"})
    history = [1, 2, 3]
    first = allowed_ids(processor, history, width)
    assert {start, brace} <= first and not first & ({end} | eos)
    history.append(start)
    assert len(allowed_ids(processor, history, width)) == width  # reasoning: free
    history += [*tok.encode("JSON, then.", add_special_tokens=False), end]
    after = allowed_ids(processor, history, width)
    assert brace in after and not after & ({start, end} | eos)
    history += answer
    assert allowed_ids(processor, history, width) == eos
    assert processor.accepting and processor.error is None

    opened = response_format_processor(tok, {"type": "json_object"})
    assert len(allowed_ids(opened, [1, start], width)) == width  # the prompt opened it
    at_once = response_format_processor(tok, {"type": "json_object"})
    history = [1, 2, 3]
    allowed_ids(at_once, history, width)
    assert allowed_ids(at_once, history + answer, width) == eos
    assert at_once.error is None


# -- decoding under a grammar ----------------------------------------------------------------

QUESTIONS = [
    "Describe a fictional person as JSON with a name and an age.",
    "Who wrote Hamlet? Answer in JSON.",
]


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("strategy", "temp", "question"),
    [("final", 0.9, QUESTIONS[1]), ("confident", 0.0, QUESTIONS[1]), ("dola", 0.0, QUESTIONS[0])],
)
def test_generate_follows_the_schema(smollm2, strategy, temp, question):
    model, tok = smollm2
    processor = response_format_processor(tok, json_schema("person", PERSON, strict=True))
    result = generate(
        model,
        tok,
        build_prompt(tok, question),
        strategy=strategy,
        logits_processors=[processor],
        temp=temp,
        seed=3,
        max_tokens=64,
    )
    assert result.finish_reason == "stop", result.text
    assert matches(json.loads(result.text), PERSON), result.text
    assert processor.error is None


@pytest.mark.real_model
def test_rows_with_different_schemas_share_one_engine(smollm2):
    model, tok = smollm2
    rows = [
        ("final", 0.0, json_schema("person", PERSON), QUESTIONS[0]),
        ("confident", 0.7, json_schema("city", CITY), "Name a sunny city as JSON."),
        ("dola", 0.8, json_schema("primes", PRIMES), "The first prime numbers, as a JSON list."),
        ("final", 0.9, {"type": "json_object"}, "A JSON object about cats."),
        ("final", 0.0, None, "Say hello."),  # a free row beside them
        ("confident", 0.0, json_schema("city", CITY), "Where is the Colosseum? JSON please."),
    ]
    engine = Engine(model, tok)
    formats = {}
    for i, (strategy, temp, fmt, question) in enumerate(rows):
        processor = response_format_processor(tok, fmt)
        plan = Plan(
            resolve_strategy(strategy),
            GenerationOptions.build(temp=temp, seed=i, max_tokens=64),
            logits_processors=(processor,) if processor else (),
        )
        formats[engine.add(build_prompt(tok, question), plan)] = fmt
    texts = {key: "" for key in formats}
    finish = {}
    for events in engine.run():
        for event in events:
            texts[event.row] += event.text
            if event.finish_reason:
                finish[event.row] = event.finish_reason
    for key, fmt in formats.items():
        if fmt is None:
            continue
        assert finish[key] == "stop", texts[key]
        value = json.loads(texts[key])
        schema = fmt.get("json_schema", {}).get("schema", {"type": "object"})
        assert matches(value, schema) if fmt["type"] == "json_schema" else isinstance(value, dict)
