"""What users moving from mlx_lm.server expect, through the openai client against a real
server: tools, structured output, several samples, the prompt cache, echo with logprobs,
CORS, the tokenizer endpoints, and a 400 for every bad value of the new fields."""

from __future__ import annotations

import json
import math

import pytest

from .test_serve import Server
from .test_structured import PERSON
from .test_toolcalls import TOOLS_TEMPLATE, WEATHER, tools_tokenizer  # noqa: F401 - a fixture

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (dev extra)")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = [pytest.mark.real_model, pytest.mark.cross_process, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
ORIGIN = "http://front-end.test"
SCHEMA = {"name": "person", "schema": PERSON}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE, encoding="utf-8")
    args = ["--chat-template", str(template), "--allowed-origins", ORIGIN]
    with Server(MODEL, *args, "--max-tokens-limit", "256") as s:
        yield s


def chat(client, content, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def test_required_tool_calls_whole_and_streamed(server):
    client = server.client()
    ask = {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 60, "temperature": 0}
    reply = chat(client, "What is the weather in Paris?", **ask)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    assert call.id.startswith("call_")
    # Streamed: the call comes as a delta with its index, the last chunk says tool_calls.
    chunks = list(chat(client, "What is the weather in Paris?", stream=True, **ask))
    deltas = [t for c in chunks for t in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert [d.function.name for d in deltas] == ["get_weather"] and deltas[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result go back as messages; the model answers in text.
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"},
    ]
    after = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=20, temperature=0
    )
    assert after.choices[0].message.content


def test_json_schema_answers_all_validate_with_several_samples(server):
    client = server.client()
    reply = chat(
        client,
        "Describe a person as JSON.",
        n=3,
        temperature=0.9,
        max_tokens=160,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        },
        extra_body={"strategy": "confident", "strategy_params": {"window": 8}},
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert reply.usage.completion_tokens == sum(
        len(c.model_extra["layerdecode"]["layers"]) for c in reply.choices
    )
    # Seeded samples draw from seed, seed + 1, ...: the same request gives the same three.
    again = [
        chat(client, "Name a fruit.", n=3, temperature=1.0, seed=5, max_tokens=8) for _ in range(2)
    ]
    texts = [[c.message.content for c in r.choices] for r in again]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1


def test_the_prompt_cache_serves_the_next_turn(server, smollm2, tools_tokenizer):  # noqa: F811
    from layerdecode import build_prompt, generate

    client = server.client()
    history = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."},
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=24, temperature=0
    )
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And three animals?"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=24, temperature=0,
        extra_body={"strategy": "confident", "strategy_params": {"window": 8}},
    )  # fmt: skip
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The whole first exchange came from the cache; only the new turn was prefilled.
    assert first.choices[0].message.content
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens
    # The same tokens and layers as a cold run of the whole conversation (in the template
    # the server was given).
    model, tokenizer = smollm2[0], tools_tokenizer
    cold = generate(
        model, tokenizer, build_prompt(tokenizer, history), strategy="confident",
        params={"window": 8}, max_tokens=24,
    )  # fmt: skip
    assert second.choices[0].message.content == cold.text
    assert second.choices[0].model_extra["layerdecode"]["layers"] == cold.layers


def test_echo_scores_the_prompt_under_the_strategy(server, smollm2):
    from layerdecode.harness.scoring import PositionScorer
    from layerdecode.registry import get_strategy

    client = server.client()
    model, tokenizer = smollm2
    ids = tokenizer.encode("The capital of France is Paris")
    reply = client.completions.create(
        model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0,
        extra_body={"strategy": "dola-low"},
    )  # fmt: skip
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == len(ids) + 1
    assert reply.choices[0].text.startswith(tokenizer.decode(ids))
    import mlx.core as mx

    scorer = PositionScorer(model, get_strategy("dola", layers="low"))
    passed = scorer.forward(mx.array(ids)[None])
    scores = scorer.score(passed, [0] * (len(ids) - 1), range(len(ids) - 1), ids[1:])
    for got, want in zip(logprobs.token_logprobs[1 : len(ids)], scores.logprobs.tolist(),
                         strict=True):  # fmt: skip
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4)
    # Several prompts in one request: a choice each, in order.
    two = client.completions.create(model=MODEL, prompt=["One, two,", "Red, green,"], max_tokens=3)
    assert [c.index for c in two.choices] == [0, 1]


def test_cors_and_the_tokenizer_endpoints(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})  # fmt: skip
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    assert response.getheader("access-control-allow-origin") == ORIGIN
    conn.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST"})  # fmt: skip
    response = conn.getresponse()
    response.read()
    assert response.getheader("access-control-allow-origin") is None
    status, info = server.get("/tokenizer_info")
    assert status == 200 and info["eos_token"]
    status, tokens, _ = server.post(
        "/tokenize", {"prompt": "Hello world", "add_special_tokens": False}
    )
    assert status == 200 and tokens["tokens"]
    status, text, _ = server.post("/detokenize", {"tokens": tokens["tokens"]})
    assert text["prompt"] == "Hello world"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),  # fmt: skip
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tools",
        ),  # fmt: skip
        ({"logit_bias": {"x": 1}}, None),
        ({"logit_bias": {"999999999": 1}}, None),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
                    }
                ]
            },
            "messages",
        ),  # fmt: skip
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_values_of_the_new_fields_are_400s(server, body, param):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    status, data, _ = server.post("/v1/chat/completions", request)
    assert status == 400, data
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in data["error"]["message"]
    if param is not None:
        assert data["error"]["param"] == param


def test_bad_token_prompts_are_400s(server):
    for prompt in ([10**9], [-1], [[]], [1.5]):
        status, data, _ = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})
        assert status == 400 and data["error"]["param"] == "prompt", (prompt, data)


def test_what_mlx_lm_server_clients_send_is_read_as_it_reads_it(server):
    # 0 turns top_p and the repetition penalty off; a tool may come without a description.
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "top_p": 0,
        "repetition_penalty": 0,
        "tools": [{"type": "function", "function": {"name": "f", "description": None}}],
    }
    status, data, _ = server.post("/v1/chat/completions", body)  # fmt: skip
    assert status == 200, data
    # A boolean logprobs on completions: false is none.
    status, data, _ = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2,
                                                      "logprobs": False})  # fmt: skip
    assert status == 200 and data["choices"][0]["logprobs"] is None
    # The echoed prompt and the answer join as the tokenizer joins them (no space lost).
    status, data, _ = server.post("/v1/completions", {
        "prompt": "The capital of France is", "max_tokens": 3, "echo": True})  # fmt: skip
    text = data["choices"][0]["text"]
    assert text.startswith("The capital of France is ") and len(text) > 25
