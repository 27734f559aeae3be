"""Tool calls: the request's tools checked, and calls split out of streamed answer text.

The splitter runs mlx-lm's own parsers (json_tools, qwen3_coder, pythonic, mistral) on
hand-written answers cut into pieces every way a stream may cut them. With the real
SmolLM2 tokenizer given a Qwen-style tools template (mlx-lm infers its parser from it),
prompts carry the tools and a past call, and a row forced by a grammar writes a call that
comes out as an OpenAI tool call.
"""

from __future__ import annotations

import json
import random

import pytest

from layerdecode import ConfigError
from layerdecode.prompts import build_prompt
from layerdecode.toolcalls import (
    ToolCallSplitter,
    ToolFormat,
    check_tool_choice,
    check_tool_message,
    check_tools,
    is_tool_message,
    tool_choice_grammar,
    tool_choice_processor,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, TIME]

JSON_ANSWER = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {"zone": "CET"}}\n'
    "</tool_call>"
)


def run(splitter, pieces):
    """Feed ``pieces``; the text and the calls released, and what each piece released."""
    released = [splitter.add(p) for p in pieces[:-1]] + [splitter.finish(pieces[-1])]
    text = "".join(r.text for r in released)
    calls = [c for r in released for c in r.calls]
    return text, calls, released


def cuts(text, seed):
    """``text`` cut at random places (some pieces empty), as a stream of tokens cuts it."""
    rng = random.Random(seed)
    points = sorted(rng.sample(range(len(text) + 1), k=min(len(text), 12)))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@pytest.mark.parametrize("seed", range(6))
def test_json_tools_calls_come_out_however_the_text_is_cut(seed):
    pieces = list(JSON_ANSWER) if seed == 0 else cuts(JSON_ANSWER, seed)
    splitter = ToolCallSplitter(ToolFormat.named("json_tools"), TOOLS)
    text, calls, _ = run(splitter, pieces)
    assert text == "Let me look.\n\n"
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris", "days": 2}),
        (1, "get_time", {"zone": "CET"}),
    ]
    assert splitter.finish_reason("stop") == "tool_calls"
    assert splitter.finish_reason("length") == "length"


def test_text_that_may_start_a_marker_is_held_back():
    splitter = ToolCallSplitter(ToolFormat.named("json_tools"))
    assert splitter.add("Hi <tool").text == "Hi "
    assert splitter.add("s are fun").text == "<tools are fun"
    assert splitter.add(" <tool_c").text == " "
    assert splitter.add("all>").text == ""
    piece = splitter.finish('{"name": "f", "arguments": {}}</tool_call> bye')
    assert piece.text == " bye"
    assert [(c.name, c.arguments) for c in piece.calls] == [("f", "{}")]


def test_calls_in_both_shapes():
    splitter = ToolCallSplitter(ToolFormat.named("json_tools"))
    _, (call,), _ = run(splitter, ['<tool_call>{"name": "f", "arguments": {"x": "é"}}</tool_call>'])
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.message() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "f", "arguments": '{"x": "é"}'},
    }
    assert call.delta() == {"index": 0, **call.message()}


def test_qwen3_coder_types_the_arguments_from_the_tools():
    answer = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    splitter = ToolCallSplitter(ToolFormat.named("qwen3_coder"), TOOLS)
    text, (call,), _ = run(splitter, cuts(answer, 1))
    assert text == ""
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris", "days": 3})


def test_pythonic_calls_in_one_block_get_their_own_index():
    answer = '<|tool_call_start|>[get_weather(city="Paris"), get_time(zone="CET")]<|tool_call_end|>'
    splitter = ToolCallSplitter(ToolFormat.named("pythonic"), TOOLS)
    _, calls, released = run(splitter, cuts(answer, 2))
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"}),
        (1, "get_time", {"zone": "CET"}),
    ]
    assert [c.delta()["index"] for r in released for c in r.calls] == [0, 1]


def test_mistral_calls_run_to_the_end_and_keep_their_ids():
    answer = '[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "abc123XYZ"}]'
    splitter = ToolCallSplitter(ToolFormat.named("mistral"), TOOLS)
    *_, released = run(splitter, cuts(answer, 3))
    assert all(not r.calls for r in released[:-1])  # no end marker: read at the end
    (call,) = released[-1].calls
    assert (call.id, call.name, call.arguments) == ("abc123XYZ", "get_time", "{}")


@pytest.mark.parametrize(
    ("answer", "kept"),
    [
        ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>"),
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>'),
        ('<tool_call>{"name": "f", "argu', '<tool_call>{"name": "f", "argu'),  # cut short
    ],
)
def test_a_call_that_cannot_be_read_stays_text(answer, kept, caplog):
    splitter = ToolCallSplitter(ToolFormat.named("json_tools"))
    text, calls, _ = run(splitter, ["Sure. ", answer])
    assert (text, calls) == ("Sure. " + kept, [])
    assert splitter.finish_reason("stop") == "stop"
    assert "could not be read" in caplog.text


def test_formats_by_name_and_from_a_tokenizer_without_tools():
    with pytest.raises(
        ConfigError, match="Unknown tool parser 'json_tool'. Did you mean 'json_tools'"
    ):
        ToolFormat.named("json_tool")

    class Plain:
        has_tool_calling = False

    assert ToolFormat.of(Plain()) is None
    assert ToolCallSplitter.for_tokenizer(Plain()) is None


# -- the request ---------------------------------------------------------------------------


def test_tools_and_tool_choice_as_openai_sends_them():
    tools = check_tools(TOOLS)
    assert tools == TOOLS and tools[0] is not WEATHER
    assert check_tools(None) is None and check_tools([]) is None
    assert check_tool_choice(None, tools).mode == "auto"
    assert check_tool_choice(None, None).mode == "none"
    assert check_tool_choice("none", tools).template_tools(tools) is None
    assert check_tool_choice("auto", tools).template_tools(tools) == tools
    named = {"type": "function", "function": {"name": "get_time"}}
    assert (check_tool_choice(named, tools).mode, check_tool_choice(named, tools).name) == (
        "required",
        "get_time",
    )


def fn(**function):
    return [{"type": "function", "function": function}]


@pytest.mark.parametrize(
    ("tools", "words"),
    [
        ({"type": "function"}, "tools must be a list"),
        (["get_weather"], "tools[0] must be an object"),
        ([{"type": "retrieval"}], "tools[0].type must be 'function', got 'retrieval'"),
        ([{"type": "function"}], "tools[0].function must be an object"),
        (fn(name="get weather"), "tools[0].function.name must be 1-64 letters"),
        (fn(), "tools[0].function.name must be 1-64 letters"),
        ([WEATHER, WEATHER], "tools[1].function.name 'get_weather' is given twice"),
        (fn(name="f", parameters="object"), "parameters must be a JSON Schema object"),
        (fn(name="f", description=3), "description must be a string"),
        (fn(name="f", strict="yes"), "strict must be true or false"),
    ],
)
def test_bad_tools_are_one_line(tools, words):
    with pytest.raises(ConfigError) as info:
        check_tools(tools)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("choice", "tools", "words"),
    [
        ("any", TOOLS, "tool_choice 'any' is not supported"),
        ("requried", TOOLS, "Did you mean 'required'"),
        ("required", None, "needs tools"),
        ({"type": "function"}, TOOLS, "tool_choice must be"),
        (
            {"type": "function", "function": {"name": "get_wether"}},
            TOOLS,
            "Did you mean 'get_weather'",
        ),
        ({"type": "function", "function": {"name": "f"}}, None, "The request has no tools"),
        (3, TOOLS, "tool_choice must be"),
    ],
)
def test_bad_tool_choices_are_one_line(choice, tools, words):
    with pytest.raises(ConfigError) as info:
        check_tool_choice(choice, tools)
    assert words in str(info.value) and "\n" not in str(info.value)


ASSISTANT_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ],
}
TOOL_RESULT = {
    "role": "tool",
    "tool_call_id": "call_1",
    "content": [{"type": "text", "text": "Sunny"}],
}


def test_tool_messages_as_templates_read_them():
    assert is_tool_message(ASSISTANT_CALL) and is_tool_message(TOOL_RESULT)
    assert not is_tool_message({"role": "assistant", "content": "hi"})
    assert check_tool_message(1, ASSISTANT_CALL) == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                "id": "call_1",
            }
        ],
    }
    assert check_tool_message(2, {**TOOL_RESULT, "name": "get_weather"}) == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "Sunny",
        "name": "get_weather",
    }


def call_with(arguments):
    return {**ASSISTANT_CALL, "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"role": "tool", "content": "x"}, "messages[3] (role 'tool') needs tool_call_id"),
        ({"role": "tool", "tool_call_id": "c", "content": 5}, "messages[3].content must be text"),
        ({"role": "user", "tool_calls": []}, "role 'user' cannot carry tool calls"),
        ({"role": "assistant", "tool_calls": {}}, "tool_calls must be a list"),
        ({"role": "assistant", "tool_calls": ["f"]}, "messages[3].tool_calls[0] must be"),
        (call_with("{city: Paris}"), "tool_calls[0].function.arguments is not JSON"),
        (call_with("[1, 2]"), "function.arguments must be a JSON object"),
    ],
)
def test_bad_tool_messages_are_one_line(message, words):
    with pytest.raises(ConfigError) as info:
        check_tool_message(3, message)
    assert words in str(info.value) and "\n" not in str(info.value)


# -- a real tokenizer with a tools template --------------------------------------------------

# A Qwen-style template: mlx-lm reads "<tool_call>" and "tool_call.name" in it as json_tools.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'Call one as <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "<|im_start|>assistant\n{{ message.content }}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '\n<tool_call>\n{"name": "{{ tool_call.name }}", '
    '"arguments": {{ tool_call.arguments | tojson }}}'
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- elif message.role == 'function' %}{{ raise_exception('Use role tool, not function.') }}"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="module")
def tools_tokenizer(smollm2, tmp_path_factory):
    """SmolLM2's tokenizer with the tools template, loaded as mlx-lm loads a model's."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    hf = smollm2[1]._tokenizer
    folder = tmp_path_factory.mktemp("tools-tokenizer")
    before = hf.chat_template
    hf.chat_template = TOOLS_TEMPLATE
    try:
        hf.save_pretrained(folder)
    finally:
        hf.chat_template = before
    return load_tokenizer(folder)


@pytest.mark.real_model
def test_the_prompt_shows_the_tools_and_past_calls(tools_tokenizer):
    tok = tools_tokenizer
    assert (tok.has_tool_calling, tok.tool_call_start, tok.tool_call_end) == (
        True,
        "<tool_call>",
        "</tool_call>",
    )
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        check_tool_message(1, ASSISTANT_CALL),
        check_tool_message(2, TOOL_RESULT),
    ]
    text = tok.decode(build_prompt(tok, messages, tools=check_tools(TOOLS)))
    assert json.dumps(WEATHER) in text and '"name": "get_time"' in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<tool_response>\nSunny\n</tool_response>" in text
    assert "<tools>" not in tok.decode(build_prompt(tok, messages))  # no tools: none shown


@pytest.mark.real_model
def test_a_template_that_rejects_the_messages_is_one_line(tools_tokenizer):
    with pytest.raises(ConfigError, match="The chat template rejected the messages: Use role tool"):
        build_prompt(tools_tokenizer, [{"role": "function", "content": "x"}])


def test_tool_choice_grammar_only_where_a_call_is_required_as_json():
    tools = check_tools(TOOLS)
    json_calls = ToolFormat.named("json_tools")
    assert tool_choice_grammar(json_calls, tools, check_tool_choice("auto", tools)) is None
    assert tool_choice_grammar(json_calls, tools, check_tool_choice("none", tools)) is None
    required = check_tool_choice("required", tools)
    assert tool_choice_grammar(ToolFormat.named("qwen3_coder"), tools, required) is None
    grammar = tool_choice_grammar(json_calls, tools, required)
    assert '"const": "get_weather"' in grammar and '"const": "get_time"' in grammar


@pytest.mark.real_model
def test_required_tool_calls_follow_the_tools(tools_tokenizer):
    import mlx.core as mx

    tok = tools_tokenizer
    tools = check_tools(TOOLS)
    answer = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )

    def walk(choice, text):
        processor = tool_choice_processor(tok, tools, check_tool_choice(choice, tools))
        history = [1]
        for token in [None, *tok.encode(text, add_special_tokens=False)]:
            if token is not None:
                history.append(token)
            processor(mx.array(history, dtype=mx.int32), mx.zeros((1, len(tok._tokenizer))))
        return processor

    done = walk("required", answer)
    assert done.accepting and done.error is None
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert walk(named, answer).error  # one call of get_weather only
    wrong = answer.replace('"days": 2', '"days": "two"')
    assert walk("required", wrong).error
    assert tool_choice_processor(tok, tools, check_tool_choice("auto", tools)) is None


@pytest.mark.real_model
def test_a_row_made_to_call_a_tool_hands_back_the_call(smollm2, tools_tokenizer):
    """tool_choice names get_weather; the row's text comes out as one call of it."""
    from layerdecode import Engine, GenerationOptions, Plan, resolve_strategy

    model, tok = smollm2[0], tools_tokenizer
    tools = check_tools(TOOLS)
    choice = check_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    engine = Engine(model, tok)
    prompt = build_prompt(tok, "What is the weather in Paris?", tools=choice.template_tools(tools))
    processors = (tool_choice_processor(tok, tools, choice),)
    options = GenerationOptions.build(max_tokens=48)
    engine.add(prompt, Plan(resolve_strategy("confident"), options, logits_processors=processors))
    splitter = ToolCallSplitter.for_tokenizer(tok, tools)
    texts, calls, finish = [], [], None
    for events in engine.run():
        for event in events:
            if event.finish_reason:
                piece = splitter.finish(event.text)
                finish = splitter.finish_reason(event.finish_reason)
            else:
                piece = splitter.add(event.text)
            texts.append(piece.text)
            calls += piece.calls
    assert "".join(texts) == "" and finish == "tool_calls"
    (call,) = calls
    assert call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
