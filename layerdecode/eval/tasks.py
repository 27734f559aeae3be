"""Evaluation tasks: how to read items from a data file, build prompts and score answers.

A task is a recipe with four steps: read ``Example``s from a file, turn each into an ``Item``
(chat messages plus a raw-text prompt for models without a chat template), extract the answer
from generated text, and compare it with the gold answer.

========  ===============================  ============================================
task      data file                        gold / scoring
========  ===============================  ============================================
gsm8k     JSONL ``question``, ``answer``   number after ``#### `` in ``answer``; numeric
svamp     JSONL ``body``, ``question``,    ``answer`` (a number); numeric
          ``answer``
choice    JSONL or CSV, see ``ChoiceTask`` option letter; letter match
bbh       JSON ``{"examples": [{"input",   ``target``; exact match after normalisation
          "target"}]}`` (or JSONL)
========  ===============================  ============================================

Item ids are the record's ``id`` field when it has one, else its position: the line number
in a JSONL file, the row number (from 1, header excluded) in a CSV file, the example number
(from 1) in a BBH JSON file. Ids must be unique within a file.

Options (all tasks, validated strictly): ``shots`` worked examples shown before the question,
taken from ``exemplars`` (a file in the same format) or else from the first items of the
evaluated file, skipping the item being asked; ``exemplar_format`` "chat" (previous
user/assistant turns) or "inline" (one user message); ``system_prompt`` (none by default,
since some chat templates reject a system turn); ``instruction`` to replace the task's
answer-format instruction.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerdecode.errors import ConfigError, did_you_mean, one_line_error
from layerdecode.eval import answers

__all__ = [
    "Example",
    "Item",
    "Score",
    "Task",
    "TaskOptions",
    "MathTask",
    "Gsm8kTask",
    "SvampTask",
    "ChoiceTask",
    "BbhTask",
    "TASKS",
    "get_task",
    "task_names",
]

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One parsed record: the question as shown to the model, its gold answer and a worked
    answer used when it serves as a few-shot exemplar."""

    id: str
    question: str
    gold: str
    solution: str
    record: dict[str, Any]
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Item:
    """One question ready to run.

    ``prompt`` is the chat-message list to pass to a chat template; ``prompt_text`` is the
    same content as plain text for models without one. ``options`` holds the option texts of
    multiple-choice items (empty otherwise).
    """

    id: str
    prompt: list[Message]
    prompt_text: str
    gold: str
    record: dict[str, Any] = field(repr=False)
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Score:
    """The answer extracted from one generation (None if none was found) and its verdict."""

    extracted: str | None
    correct: bool


class TaskOptions(BaseModel):
    """Options every task accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shots: int = Field(0, ge=0, le=64, description="Worked examples shown before each question.")
    exemplars: Path | None = Field(
        None, description="File of exemplars (same format); default: the evaluated file."
    )
    exemplar_format: Literal["chat", "inline"] = Field(
        "chat", description="Exemplars as earlier chat turns, or inline in one user message."
    )
    system_prompt: str | None = Field(None, description="System message; none by default.")
    instruction: str | None = Field(
        None, description="Replaces the task's instruction on how to state the answer."
    )


def _options_error(task: str, error: ValidationError) -> ConfigError:
    first = error.errors()[0]
    if first["type"] == "extra_forbidden":
        where = ".".join(str(part) for part in first["loc"])
        hint = did_you_mean(where, TaskOptions.model_fields)
        known = ", ".join(TaskOptions.model_fields)
        return ConfigError(
            f"Unknown option '{where}' for task '{task}'.{hint} Known options: {known}"
        )
    return ConfigError(one_line_error(error, f"Invalid option for task '{task}'"))


# ---------------------------------------------------------------------------------------------
# Reading files: one clear line naming the file and line for every malformed input.


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"Data file {path} not found")


def _read_jsonl(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(where, record) for each non-blank line; ``where`` is "file:line" for messages."""
    _check_file(path)
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, number, record


def _read_csv(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    _check_file(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for number, row in enumerate(reader, start=1):
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise ConfigError(f"{where}: more cells than header columns")
            yield where, number, {key.strip(): value for key, value in row.items()}


def _field(record: dict[str, Any], names: tuple[str, ...], where: str) -> Any:
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    wanted = " or ".join(f"'{name}'" for name in names)
    raise ConfigError(f"{where}: missing field {wanted}")


def _text(record: dict[str, Any], names: tuple[str, ...], where: str) -> str:
    value = _field(record, names, where)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: field '{names[0]}' must be a non-empty string")
    return value.strip()


def _number(value: Any, name: str, where: str) -> str:
    parsed = answers.parse_number(str(value)) if not isinstance(value, bool) else None
    if parsed is None:
        raise ConfigError(f"{where}: field '{name}' is not a number: {value!r}")
    return answers.format_number(parsed)


def _record_id(record: dict[str, Any], position: int) -> str:
    value = record.get("id")
    return str(value) if value is not None and str(value).strip() else str(position)


# ---------------------------------------------------------------------------------------------
# Tasks


class Task:
    """Base recipe. Subclasses set ``name``, ``instruction`` and implement ``read`` and
    ``extract``/``is_correct``; prompt building and few-shot selection are shared."""

    name: ClassVar[str]
    summary: ClassVar[str]
    instruction: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options.model_validate(options)
        except ValidationError as error:
            raise _options_error(self.name, error) from None

    # -- to implement -------------------------------------------------------------------------
    def _parse(self, where: str, position: int, record: dict[str, Any]) -> Example:
        raise NotImplementedError

    def _records(self, path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
        return _read_jsonl(path)

    def extract(self, text: str, item: Item) -> str | None:
        """The answer stated in generated ``text``, in canonical form, or None."""
        raise NotImplementedError

    def is_correct(self, extracted: str | None, item: Item) -> bool:
        """Whether an extracted answer matches the item's gold answer."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def read(self, path: str | Path) -> list[Example]:
        """All examples of a data file, in file order; ConfigError names the bad line."""
        path = Path(path)
        examples, seen = [], {}
        for where, position, record in self._records(path):
            example = self._parse(where, position, record)
            if example.id in seen:
                raise ConfigError(
                    f"{where}: duplicate id '{example.id}' (also at {seen[example.id]})"
                )
            seen[example.id] = where
            examples.append(example)
        if not examples:
            raise ConfigError(f"{path}: no items (empty file)")
        return examples

    def load(self, path: str | Path, *, offset: int = 0, limit: int | None = None) -> list[Item]:
        """Items ``offset`` to ``offset + limit`` of a data file, prompts built."""
        if offset < 0 or (limit is not None and limit < 1):
            raise ConfigError("offset must be >= 0 and limit >= 1")
        examples = self.read(path)
        if offset >= len(examples):
            raise ConfigError(f"{path}: offset {offset} is past the last item ({len(examples)})")
        chosen = examples[offset : None if limit is None else offset + limit]
        shots = self.options.shots
        pool = examples
        if shots and self.options.exemplars is not None:
            pool = self.read(self.options.exemplars)
        same_file = self.options.exemplars is None
        if shots and len(pool) < shots + same_file:
            source = self.options.exemplars or path
            raise ConfigError(f"{source}: {len(pool)} items, too few for shots={shots}")
        return [
            self.build(example, self._exemplars(example, pool, same_file)) for example in chosen
        ]

    def _exemplars(self, example: Example, pool: list[Example], same_file: bool) -> list[Example]:
        if not self.options.shots:
            return []
        candidates = [e for e in pool if not (same_file and e.id == example.id)]
        return candidates[: self.options.shots]

    def build(self, example: Example, exemplars: list[Example] = ()) -> Item:
        """The Item for one example, with ``exemplars`` as worked examples."""
        instruction = self.options.instruction or self.instruction
        system = self.options.system_prompt

        def ask(question: str) -> str:
            return f"{question}\n\n{instruction}"

        inline = "".join(f"Question: {e.question}\nAnswer: {e.solution}\n\n" for e in exemplars)
        messages: list[Message] = [{"role": "system", "content": system}] if system else []
        if self.options.exemplar_format == "chat":
            for e in exemplars:
                messages.append({"role": "user", "content": ask(e.question)})
                messages.append({"role": "assistant", "content": e.solution})
            messages.append({"role": "user", "content": ask(example.question)})
        else:
            body = f"{instruction}\n\n{inline}Question: {example.question}\nAnswer:"
            messages.append({"role": "user", "content": body})
        head = f"{system}\n\n" if system else ""
        text = f"{head}{instruction}\n\n{inline}Question: {example.question}\nAnswer:"
        return Item(
            id=example.id,
            prompt=messages,
            prompt_text=text,
            gold=example.gold,
            record=example.record,
            options=example.options,
        )

    def score(self, text: str, item: Item) -> Score:
        """Extract the answer from generated ``text`` and judge it against ``item.gold``."""
        extracted = self.extract(text, item)
        return Score(extracted=extracted, correct=self.is_correct(extracted, item))


class MathTask(Task):
    """Numeric answers: extraction by ``answers.extract_number``, tolerance 1e-6."""

    instruction = (
        "Solve the problem. Reason step by step, then finish with a final line of the form "
        '"The answer is N." where N is the number only.'
    )

    def extract(self, text: str, item: Item) -> str | None:
        return answers.extract_number(text)

    def is_correct(self, extracted: str | None, item: Item) -> bool:
        return answers.numbers_equal(extracted, item.gold)


class Gsm8kTask(MathTask):
    """GSM8K: JSONL with ``question`` and ``answer``; the gold number follows ``#### `` at the
    end of ``answer`` (commas stripped). Exemplars show the worked solution without the
    ``<<...>>`` calculator notes, ending in "The answer is N."."""

    name = "gsm8k"
    summary = "grade-school math word problems (JSONL question/answer, gold after ####)"

    def _parse(self, where: str, position: int, record: dict[str, Any]) -> Example:
        question = _text(record, ("question",), where)
        answer = _text(record, ("answer",), where)
        if "####" not in answer:
            raise ConfigError(f"{where}: field 'answer' has no '#### <number>' gold marker")
        reasoning, _, gold_text = answer.rpartition("####")
        gold = _number(gold_text.strip().replace(",", ""), "answer", where)
        steps = " ".join(_strip_calculator(reasoning).split())
        solution = f"{steps} The answer is {gold}.".strip()
        return Example(_record_id(record, position), question, gold, solution, record)


def _strip_calculator(text: str) -> str:
    return re.sub(r"<<[^>]*>>", "", text)


class SvampTask(MathTask):
    """SVAMP: JSONL with ``body``, ``question`` and a numeric ``answer``; the question shown is
    ``body + " " + question``. Exemplars show ``equation = answer``."""

    name = "svamp"
    summary = "arithmetic word problems (JSONL body/question/answer)"

    def _parse(self, where: str, position: int, record: dict[str, Any]) -> Example:
        question = f"{_text(record, ('body',), where)} {_text(record, ('question',), where)}"
        gold = _number(_field(record, ("answer",), where), "answer", where)
        equation = record.get("equation")
        shown = f"{equation.strip()} = {gold}. " if isinstance(equation, str) else ""
        return Example(
            _record_id(record, position), question, gold, f"{shown}The answer is {gold}.", record
        )


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ChoiceTask(Task):
    """Multiple choice (GPQA-style), JSONL or CSV (chosen by the ``.csv`` suffix).

    Question: field ``question`` (or ``Question``). Options, the first form present:
    a list field ``options`` or ``choices``; columns ``A``, ``B``, ``C``, ... (from A, no
    gaps); or GPQA's ``Correct Answer`` + ``Incorrect Answer 1..n`` columns, shuffled with a
    seed derived from the item id so every run shows the same order.

    Gold, from ``answer`` or ``gold``: a letter ("B" or "(B)"); else text equal to exactly one
    option; else an integer (JSON number or digits) read as a 0-based option index. Anything
    else is refused with the file and line.
    """

    name = "choice"
    summary = "multiple choice (JSONL/CSV question + options + gold letter/text/index)"
    instruction = (
        "Reason step by step, then finish with a final line of the form "
        '"The answer is (X)." where X is the letter of the correct option.'
    )

    def _records(self, path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
        return _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path)

    def _parse(self, where: str, position: int, record: dict[str, Any]) -> Example:
        question = _text(record, ("question", "Question"), where)
        item_id = _record_id(record, position)
        options, gold_index = self._options(record, item_id, where)
        if gold_index is None:
            gold_index = self._gold_index(_field(record, ("answer", "gold"), where), options, where)
        gold = _LETTERS[gold_index]
        listed = "\n".join(f"({_LETTERS[i]}) {text}" for i, text in enumerate(options))
        return Example(
            item_id, f"{question}\n\n{listed}", gold, f"The answer is ({gold}).", record, options
        )

    @staticmethod
    def _options(
        record: dict[str, Any], item_id: str, where: str
    ) -> tuple[tuple[str, ...], int | None]:
        for name in ("options", "choices"):
            if name in record:
                value = record[name]
                if not isinstance(value, list) or not all(
                    isinstance(v, str | int | float) for v in value
                ):
                    raise ConfigError(f"{where}: field '{name}' must be a list of strings")
                return ChoiceTask._checked([str(v).strip() for v in value], where), None
        if "A" in record:
            columns = []
            for letter in _LETTERS:
                if letter not in record or record[letter] in (None, ""):
                    break
                columns.append(str(record[letter]).strip())
            return ChoiceTask._checked(columns, where), None
        if "Correct Answer" in record:
            correct = str(record["Correct Answer"]).strip()
            wrong = [
                str(record[key]).strip()
                for key in sorted(k for k in record if k.startswith("Incorrect Answer"))
                if str(record[key] or "").strip()
            ]
            options = [correct, *wrong]
            seed = int(hashlib.sha256(item_id.encode()).hexdigest()[:16], 16)
            random.Random(seed).shuffle(options)
            return ChoiceTask._checked(options, where), options.index(correct)
        raise ConfigError(
            f"{where}: no options: expected a list field 'options' or 'choices', columns "
            "'A', 'B', ..., or 'Correct Answer' + 'Incorrect Answer 1..n'"
        )

    @staticmethod
    def _checked(options: list[str], where: str) -> tuple[str, ...]:
        if not 2 <= len(options) <= len(_LETTERS) or not all(options):
            raise ConfigError(f"{where}: need 2 to 26 non-empty options, got {len(options)}")
        return tuple(options)

    @staticmethod
    def _gold_index(value: Any, options: tuple[str, ...], where: str) -> int:
        text = str(value).strip()
        letter = text.strip("()").strip()
        if isinstance(value, str) and len(letter) == 1 and letter.upper() in _LETTERS:
            index = _LETTERS.index(letter.upper())
        elif isinstance(value, str) and options.count(text) == 1:
            index = options.index(text)
        elif not isinstance(value, bool) and (isinstance(value, int) or text.isdigit()):
            index = int(text)
        else:
            raise ConfigError(
                f"{where}: gold {value!r} is not an option letter, an option's text or a "
                "0-based option index"
            )
        if not 0 <= index < len(options):
            raise ConfigError(f"{where}: gold {value!r} is out of range for {len(options)} options")
        return index

    def extract(self, text: str, item: Item) -> str | None:
        return answers.extract_letter(text, len(item.options))

    def is_correct(self, extracted: str | None, item: Item) -> bool:
        return extracted is not None and extracted == item.gold


class BbhTask(Task):
    """BIG-Bench Hard: a JSON file ``{"examples": [{"input": ..., "target": ...}]}`` as in the
    BBH repository (or JSONL with the same fields). Scored by exact match after
    normalisation: case, surrounding whitespace and markdown, a trailing period; a gold option
    like "(A)" also accepts "A" and "(A) text"; numeric targets compare by value."""

    name = "bbh"
    summary = 'BIG-Bench Hard (JSON {"examples": [{"input", "target"}]}), exact match'
    instruction = (
        "Think step by step, then finish with a final line of the form "
        '"So the answer is X." where X is the answer only.'
    )

    def _records(self, path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path)
        _check_file(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
            raise ConfigError(f'{path}: expected a JSON object {{"examples": [...]}}')
        rows = []
        for index, record in enumerate(data["examples"]):
            if not isinstance(record, dict):
                raise ConfigError(f"{path}: examples[{index}] is not an object")
            rows.append((f"{path}: examples[{index}]", index + 1, record))
        return iter(rows)

    def _parse(self, where: str, position: int, record: dict[str, Any]) -> Example:
        question = _text(record, ("input",), where)
        target = _field(record, ("target",), where)
        if not isinstance(target, str | int | float) or isinstance(target, bool):
            raise ConfigError(f"{where}: field 'target' must be a string")
        gold = str(target).strip()
        return Example(
            _record_id(record, position), question, gold, f"So the answer is {gold}.", record
        )

    def extract(self, text: str, item: Item) -> str | None:
        return answers.extract_phrase(text)

    def is_correct(self, extracted: str | None, item: Item) -> bool:
        return answers.phrases_equal(extracted, item.gold)


TASKS: dict[str, type[Task]] = {
    task.name: task for task in (Gsm8kTask, SvampTask, ChoiceTask, BbhTask)
}


def task_names() -> list[str]:
    """Names of the known tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str, **options: Any) -> Task:
    """A task by name, with validated options; ConfigError for unknown names or options."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown task '{name}'.{did_you_mean(name, TASKS)} Known tasks: "
            f"{', '.join(task_names())}"
        ) from None
    return cls(**options)
