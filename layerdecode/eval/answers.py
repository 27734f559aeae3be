"""Answer extraction from generated text, and comparison with gold answers.

Every extractor prefers an explicit answer marker (``\\boxed{...}``, ``#### ...``, "the answer
is ...", "Answer: ...") and, among markers, the last one in the text: models often restate or
correct themselves, and the last statement is the one they end on.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "extract_number",
    "parse_number",
    "format_number",
    "numbers_equal",
    "extract_letter",
    "extract_phrase",
    "normalize_phrase",
    "phrases_equal",
]

# A number as written in prose: "-1,000.50", "$ 3", ".5", "3/4", "−2" (Unicode minus).
# Commas only count as thousands separators ("1,000"), so "3,4,5" reads as three numbers.
_NUMBER = re.compile(
    r"(?<![\w.])[-−]?\s?\$?\s?"
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?\d+(?:\.\d+)?)?"
)
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_MARKER = re.compile(r"(?i)(?:####|\banswer\b\s*(?:is\b|:|=)|\banswer\b\s*\*\*\s*:)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_TOLERANCE = 1e-6


def _boxed_spans(text: str) -> list[tuple[int, str]]:
    """(position, content) of every ``\\boxed{...}``, with nested braces matched."""
    spans = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    spans.append((match.start(), text[start:i]))
                    break
    return spans


def _marker_spans(text: str) -> list[tuple[int, str]]:
    """(position, text that follows) for each answer marker: the rest of its line, or the
    next non-empty line when the marker ends its line ("Answer:\\n 18")."""
    spans = []
    for match in _MARKER.finditer(text):
        rest = re.match(r"[\s*:]*([^\n]*)", text[match.end() :])
        spans.append((match.start(), rest.group(1) if rest else ""))
    return spans


def _explicit_spans(text: str) -> list[str]:
    """Contents of all explicit answer markers, ordered by position (last = strongest)."""
    spans = _boxed_spans(text) + _marker_spans(text)
    return [content for _, content in sorted(spans)]


def parse_number(text: str) -> float | None:
    """The value of one number as written in prose ("$1,000", "-3/4", "1000.00"), else None."""
    cleaned = _FRAC.sub(r"\1/\2", text)
    cleaned = cleaned.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            return float(Fraction(num) / Fraction(den)) if Fraction(den) != 0 else None
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _first_number(text: str) -> float | None:
    for match in _NUMBER.finditer(_FRAC.sub(r"\1/\2", text)):
        value = parse_number(match.group(0))
        if value is not None:
            return value
    return None


def format_number(value: float) -> str:
    """Canonical text of a number: "1000" for 1000.0, "0.75" for 3/4."""
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def extract_number(text: str) -> str | None:
    """The final numeric answer in ``text`` in canonical form, or None.

    The last explicit marker that holds a number wins (``\\boxed{18}``, "#### 18",
    "The answer is $1,000.", "**Answer:** 18", "The answer is 5 + 3 = 8."); without one, the
    last number in the text. Thousands commas, "$", units and trailing periods are ignored;
    "3/4" and ``\\frac{3}{4}`` read as 0.75.
    """
    for content in reversed(_explicit_spans(text)):
        # "The answer is 5 + 3 = 8." states its result after the last "=".
        value = _first_number(content.rsplit("=", 1)[-1]) if "=" in content else None
        value = _first_number(content) if value is None else value
        if value is not None:
            return format_number(value)
    numbers = [parse_number(m.group(0)) for m in _NUMBER.finditer(_FRAC.sub(r"\1/\2", text))]
    numbers = [n for n in numbers if n is not None]
    return format_number(numbers[-1]) if numbers else None


def numbers_equal(predicted: str | None, gold: str) -> bool:
    """Numeric equality with a relative tolerance of 1e-6 (so "1000.00" equals "1000")."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(gold)
    if a is None or b is None:
        return False
    return abs(a - b) <= _TOLERANCE * max(1.0, abs(b))


# "The answer is (B)", "answer: C", "Answer is option D", "answer is **B**"; the letter is
# upper case, or any case inside brackets, and must not start a word ("The answer is Alice").
_LETTER_AFTER_MARKER = re.compile(
    r"(?i:\banswer\b)(?:\s+(?i:is)\b|\s*[:=]|\s*\*\*\s*:)"
    r"(?:\s|\*|:|(?i:option|choice|therefore|likely)\b)*"
    r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?![\w]))"
)
_LETTER_BOLD_AT_END = re.compile(r"\*\*\s*\(?([A-Z])\)?\s*[.:]?\s*\*\*[\s.]*$")
_LETTER_ALONE = re.compile(r"^[\s*]*[(\[]?([A-Z])[)\]]?[.)]?[\s*]*$")


def _boxed_letter(content: str) -> str | None:
    inner = _TEXT_WRAPPER.sub(r"\1", content).strip().strip("()[] ").strip()
    return inner.upper() if re.fullmatch(r"[A-Za-z]", inner) else None


def extract_letter(text: str, n_options: int) -> str | None:
    """The chosen option letter (A, B, ...) in ``text``, or None.

    Explicit markers count -- "The answer is (B)", "Answer: C", ``\\boxed{D}``, and a bold
    "**B**" that ends the text -- and the last one in the text wins. Without any, a last line
    that is just a letter ("(B)", "B.") is taken. Letters beyond ``n_options`` are ignored.
    """
    valid = {chr(ord("A") + i) for i in range(n_options)}
    found: list[tuple[int, str]] = []
    for match in _LETTER_AFTER_MARKER.finditer(text):
        found.append((match.end(), (match.group(1) or match.group(2)).upper()))
    for position, content in _boxed_spans(text):
        letter = _boxed_letter(content)
        if letter:
            found.append((position, letter))
    bold = _LETTER_BOLD_AT_END.search(text)
    if bold:
        found.append((bold.start(), bold.group(1)))
    found = [(pos, letter) for pos, letter in found if letter in valid]
    if found:
        return max(found)[1]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    alone = _LETTER_ALONE.match(lines[-1]) if lines else None
    if alone and alone.group(1) in valid:
        return alone.group(1)
    return None


_PHRASE_MARKER = re.compile(r"(?i)\banswer\s+is\b\s*:?")
_OPTION_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[\s.:)]|$)")


def extract_phrase(text: str) -> str | None:
    """The free-form answer after the last "the answer is" or inside the last ``\\boxed{}``,
    up to the end of its sentence; without a marker, the last non-empty line."""
    found: list[tuple[int, str]] = []
    for match in _PHRASE_MARKER.finditer(text):
        rest = text[match.end() :].lstrip().split("\n", 1)[0]
        found.append((match.start(), re.split(r"\.(?=\s|$)", rest, maxsplit=1)[0]))
    for position, content in _boxed_spans(text):
        found.append((position, _TEXT_WRAPPER.sub(r"\1", content)))
    if found:
        answer = max(found)[1].strip().strip("*`").strip()
        return answer or None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize_phrase(text: str) -> str:
    """Case-folded, whitespace-collapsed text without markdown, quotes or a trailing period."""
    text = text.strip().strip("*`\"'").strip()
    text = re.sub(r"\.+$", "", text).strip()
    return " ".join(text.split()).casefold()


def phrases_equal(predicted: str | None, gold: str) -> bool:
    """Exact match after ``normalize_phrase``. A gold option like "(A)" matches "A", "(A)" and
    "(A) rectangle"; numbers compare by value ("24.0" equals "24")."""
    if predicted is None:
        return False
    gold_option = re.fullmatch(r"\(([A-Za-z])\)", gold.strip())
    if gold_option:
        letter = _OPTION_LETTER.match(predicted.strip().strip("*`").strip())
        return bool(letter) and letter.group(1).upper() == gold_option.group(1).upper()
    a, b = normalize_phrase(predicted), normalize_phrase(gold)
    if a == b:
        return True
    if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):
        return numbers_equal(a, b)
    return False
