"""Tasks: reading data files, building prompts, extracting and scoring answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerdecode.errors import ConfigError
from layerdecode.eval.answers import extract_letter, extract_number, extract_phrase
from layerdecode.eval.tasks import Item, get_task, task_names

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
GSM8K = DATA / "gsm8k_train_500.jsonl"
SVAMP = DATA / "svamp.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _item(gold: str, options: tuple[str, ...] = ()) -> Item:
    return Item(id="1", prompt=[], prompt_text="", gold=gold, record={}, options=options)


# -- numeric answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 18.", "18"),
        ("So she pays $1,000 in total. The answer is $1,000.", "1000"),
        ("The total is 1000.00", "1000"),
        (r"Adding up: 3 + 4 = 7, so \boxed{18}", "18"),
        (r"\boxed{\frac{3}{4}}", "0.75"),
        ("It takes 3/4 of an hour", "0.75"),
        ("#### 18", "18"),
        ("The temperature drops 5 degrees. The answer is -5.", "-5"),
        ("The answer is −12 meters.", "-12"),
        ("The answer is 2.5 hours.", "2.5"),
        ("**Answer:** 1,234,567", "1234567"),
        ("Answer:\n\n42", "42"),
        ("The answer is 5 + 3 = 8.", "8"),
        ("She has 10 - 4 = 6 apples left", "6"),
        ("She ends with 7 apples.", "7"),
        # An explicit marker beats a later bare number.
        ("The answer is 18.\nCheck: 18 - 3 = 15 and 15 + 3 = 18 ... 20 people.", "18"),
        # The last marker wins when the model corrects itself.
        ("The answer is 12. Wait, that's wrong. The answer is 14.", "14"),
        ("no numbers here", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("task_name", ["gsm8k", "svamp"])
def test_math_scoring_tolerance(task_name):
    task = get_task(task_name)
    assert task.score("The answer is 1000.00.", _item("1000")).correct
    assert task.score("The answer is $1,000", _item("1000")).correct
    assert task.score("The answer is 5.", _item("5.0" if task_name == "svamp" else "5")).correct
    assert not task.score("The answer is 1001.", _item("1000")).correct
    assert task.score("I am not sure.", _item("3")).extracted is None


# -- letters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Reasoning... The answer is (B).", "B"),
        ("Answer: C", "C"),
        (r"Therefore \boxed{D}", "D"),
        (r"\boxed{\text{(A)}}", "A"),
        ("Option A fails because...\n\n**B**", "B"),
        ("The answer is (b).", "B"),
        ("The answer is A. Wait, re-checking: the answer is (C).", "C"),
        ("**Final Answer: D**", "D"),
        ("The answer is Alice's choice", None),
        ("(B)", "B"),
        ("The answer is (E).", None),  # only four options
        ("I cannot decide.", None),
    ],
)
def test_extract_letter(text, expected):
    assert extract_letter(text, 4) == expected


# -- free-form (BBH) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        ("Let's think. So the answer is (A).", "(A)", True),
        ("So the answer is A.", "(A)", True),
        ("So the answer is (A) rectangle.", "(A)", True),
        ("So the answer is (B).", "(A)", False),
        ("So the answer is True.", "True", True),
        ("so the answer is **no**.", "No", True),
        ("So the answer is 24.0.", "24", True),
        (r"The result: \boxed{valid}", "valid", True),
        ("So the answer is apple banana cherry.", "apple banana cherry", True),
        ("So the answer is apple cherry banana.", "apple banana cherry", False),
        ("Valid", "valid", True),
    ],
)
def test_bbh_scoring(text, gold, correct):
    assert get_task("bbh").score(text, _item(gold)).correct is correct


def test_extract_phrase_takes_last_marker_and_sentence():
    assert extract_phrase("The answer is X. Hmm, no. So the answer is Y. Because...") == "Y"


# -- reading files ----------------------------------------------------------------------------


def test_gsm8k_items_and_prompts(tmp_path):
    rows = [
        {"question": f"Q{i}?", "answer": f"Work <<1+1=2>>2.\n#### {1000 + i:,}"} for i in range(4)
    ]
    path = _write_jsonl(tmp_path / "g.jsonl", rows)
    items = get_task("gsm8k").load(path)
    assert [i.id for i in items] == ["1", "2", "3", "4"]
    assert items[0].gold == "1000"
    assert items[0].prompt == [{"role": "user", "content": items[0].prompt[0]["content"]}]
    assert "The answer is N." in items[0].prompt[0]["content"]
    assert items[0].prompt_text.endswith("Question: Q0?\nAnswer:")

    # k-shot from the same file skips the evaluated item; exemplars are earlier chat turns.
    shot = get_task("gsm8k", shots=2, system_prompt="Be careful.").load(path, offset=1, limit=2)
    assert [i.id for i in shot] == ["2", "3"]
    roles = [m["role"] for m in shot[0].prompt]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "Q0?" in shot[0].prompt[1]["content"] and "Q2?" in shot[0].prompt[3]["content"]
    assert shot[0].prompt[2]["content"] == "Work 2. The answer is 1000."
    assert shot[0].prompt_text.startswith("Be careful.\n\n")

    inline = get_task("gsm8k", shots=1, exemplar_format="inline").load(path, limit=1)[0]
    assert (
        len(inline.prompt) == 1 and "Question: Q1?\nAnswer: Work 2." in inline.prompt[0]["content"]
    )


def test_separate_exemplar_file(tmp_path):
    evaluated = _write_jsonl(tmp_path / "e.jsonl", [{"question": "E?", "answer": "#### 1"}])
    shots = _write_jsonl(tmp_path / "s.jsonl", [{"question": "S?", "answer": "x\n#### 2"}])
    item = get_task("gsm8k", shots=1, exemplars=shots).load(evaluated)[0]
    assert item.prompt[1]["content"] == "x The answer is 2."
    with pytest.raises(ConfigError, match="too few for shots=2"):
        get_task("gsm8k", shots=2, exemplars=shots).load(evaluated)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"g\.jsonl: no items \(empty file\)"),
        (
            '{"question": "q", "answer": "#### 1"}\n{"question": "q"\n',
            r"g\.jsonl:2: not valid JSON",
        ),
        (
            '{"question": "q", "answer": "#### 1"}\n\n{"answer": "#### 2"}\n',
            r"g\.jsonl:3: missing field 'question'",
        ),
        ('{"question": "q", "answer": "no marker"}\n', r"g\.jsonl:1: .*'#### <number>'"),
        (
            '{"question": "q", "answer": "#### lots"}\n',
            r"g\.jsonl:1: field 'answer' is not a number",
        ),
        ("[1, 2]\n", r"g\.jsonl:1: expected a JSON object, got list"),
        ('{"id": 7, "question": "q", "answer": "#### 1"}\n' * 2, r"g\.jsonl:2: duplicate id '7'"),
    ],
)
def test_malformed_data_file(tmp_path, content, message):
    path = tmp_path / "g.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        get_task("gsm8k").load(path)


def test_unknown_task_and_options():
    with pytest.raises(ConfigError, match=r"Unknown task 'gsm9k'\. Did you mean 'gsm8k'\?"):
        get_task("gsm9k")
    with pytest.raises(ConfigError, match="Known tasks: bbh, choice, gsm8k, svamp"):
        get_task("nope")
    with pytest.raises(ConfigError, match="Unknown option 'shot' for task 'gsm8k'"):
        get_task("gsm8k", shot=3)
    with pytest.raises(ConfigError, match="Invalid option for task 'svamp': shots"):
        get_task("svamp", shots=-1)
    assert task_names() == ["bbh", "choice", "gsm8k", "svamp"]


def test_choice_jsonl_forms(tmp_path):
    rows = [
        {"question": "Pick?", "options": ["red", "green", "blue"], "answer": "B"},
        {"question": "Pick?", "choices": ["red", "green", "blue"], "gold": "(c)"},
        {"question": "Pick?", "choices": ["red", "green", "blue"], "answer": "red"},
        {"question": "Pick?", "choices": ["red", "green", "blue"], "answer": 1},
    ]
    items = get_task("choice").load(_write_jsonl(tmp_path / "c.jsonl", rows))
    assert [i.gold for i in items] == ["B", "C", "A", "B"]
    assert "(A) red\n(B) green\n(C) blue" in items[0].prompt[0]["content"]
    task = get_task("choice")
    assert task.score("The answer is (B).", items[0]).correct
    assert not task.score("The answer is (D).", items[0]).correct  # no option D


def test_choice_csv_forms(tmp_path):
    letters = tmp_path / "letters.csv"
    letters.write_text('question,A,B,C,D,answer\n"What, exactly?",w,x,y,z,D\n')
    item = get_task("choice").load(letters)[0]
    assert item.gold == "D" and item.options == ("w", "x", "y", "z") and item.id == "1"

    gpqa = tmp_path / "gpqa.csv"
    gpqa.write_text(
        "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
        "Which?,right,wrong1,wrong2,wrong3\n"
    )
    first = get_task("choice").load(gpqa)[0]
    again = get_task("choice").load(gpqa)[0]
    assert first.options == again.options  # shuffled, but the same every run
    assert first.options[ord(first.gold) - ord("A")] == "right"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"question": "q", "options": ["a", "b"], "answer": "Z"},
            r"c\.jsonl:1: gold 'Z' is out of range",
        ),
        (
            {"question": "q", "options": ["a", "b"], "answer": "purple"},
            r"c\.jsonl:1: gold 'purple' is not an",
        ),
        (
            {"question": "q", "options": ["a", "b"], "answer": 5},
            r"c\.jsonl:1: gold 5 is out of range",
        ),
        ({"question": "q", "options": ["a"], "answer": "A"}, r"c\.jsonl:1: need 2 to 26"),
        ({"question": "q", "answer": "A"}, r"c\.jsonl:1: no options"),
        ({"question": "q", "options": ["a", "b"]}, r"c\.jsonl:1: missing field 'answer' or 'gold'"),
    ],
)
def test_choice_bad_rows(tmp_path, row, message):
    with pytest.raises(ConfigError, match=message):
        get_task("choice").load(_write_jsonl(tmp_path / "c.jsonl", [row]))


def test_bbh_file(tmp_path):
    path = tmp_path / "bbh.json"
    path.write_text(json.dumps({"examples": [{"input": "Is it?", "target": "(A)"}] * 3}))
    items = get_task("bbh", shots=1).load(path)
    assert [i.id for i in items] == ["1", "2", "3"] and items[0].gold == "(A)"
    assert items[0].prompt[1] == {"role": "assistant", "content": "So the answer is (A)."}
    path.write_text(json.dumps({"examples": [{"input": "Is it?"}]}))
    with pytest.raises(ConfigError, match=r"examples\[0\]: missing field 'target'"):
        get_task("bbh").load(path)
    path.write_text("[]")
    with pytest.raises(ConfigError, match=r'expected a JSON object \{"examples"'):
        get_task("bbh").load(path)


# -- real data --------------------------------------------------------------------------------


@pytest.mark.skipif(not GSM8K.is_file(), reason="shared data not present")
def test_real_gsm8k_items():
    items = get_task("gsm8k", shots=3).load(GSM8K, offset=10, limit=5)
    assert len(items) == 5 and items[0].id == "11"
    task = get_task("gsm8k")
    for item in items:
        # The dataset's own worked answer ends in "#### N": it must score as correct.
        assert task.score(item.record["answer"], item).correct
        assert not task.score(f"The answer is {float(item.gold) + 1}.", item).correct
    assert get_task("gsm8k").load(GSM8K, limit=1)[0].gold == "72"


@pytest.mark.skipif(not SVAMP.is_file(), reason="shared data not present")
def test_real_svamp_items():
    items = get_task("svamp").load(SVAMP, limit=3)
    assert items[0].id == "chal-1" and items[0].gold == "51"
    assert "25 dollars on each pack How much do you have to pay" in items[0].prompt_text
    assert get_task("svamp").score("76 - 25 = 51. The answer is 51.0", items[0]).correct
    assert len(get_task("svamp").load(SVAMP)) == 1000
