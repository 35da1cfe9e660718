"""Answers: reading the answer out of generated text (`extract_choice`, `extract_yes_no`, `extract_number`,
`extract_free_form`) and coercing benchmark cell values (missing values, numbers, option letters, option lists) into
the forms the benchmarks compare. Extraction is idempotent: an already-extracted answer ("B", "yes") comes back as
it is."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

OPTION_LETTERS = "ABCDEFGH"
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}


# ----------------------------------------------------------------------------------------------------------------
# answer extraction


def clean_generation(text: Any) -> str:
    """Generated text without reasoning tags, special tokens and markdown emphasis; spaces collapsed."""
    if text is None:
        return ""
    text = str(text)
    lowered = text.lower()
    if "</think>" in lowered:
        text = text[lowered.rfind("</think>") + len("</think>") :]
    text = re.sub(r"<\|[^|>]*\|>|</?s>|<[^>\s]*answer>", " ", text)
    text = text.replace("**", " ").replace("__", " ").replace("`", " ")
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


def normalize_text(text: Any) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed (for free-form matching)."""
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def _norm_option(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


_ANSWER_RE = re.compile(r"\banswer\b\s*(?:\bis\b|:|=)\s*:?\s*(?:(?:option|choice)\s+)?", re.IGNORECASE)
_NOT_ARTICLE_NEXT = {"or", "and", "nor", "vs", "versus", "is", "seems", "would", "should", "might"}


def answer_segments(text: str) -> list[str]:
    """Texts following "answer is" / "answer:" phrases, last first (a final answer after a rationale wins)."""
    segments = []
    for match in reversed(list(_ANSWER_RE.finditer(text))):
        segment = text[match.end() :].split("\n")[0].strip()
        if segment:
            segments.append(segment)
    return segments


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?;])\s", text, maxsplit=1)[0]


def _choice_in(segment: str, letters: set[str], choices: dict[str, str]) -> str | None:
    """Letter found in `segment`; "" when ambiguous or an invalid letter; None when nothing was found."""
    s = segment.strip().strip("*_\"'` ")
    if not s:
        return None
    whole = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:,;!]?", s)
    if whole:
        letter = whole.group(1).upper()
        return letter if letter in letters else ""
    lead = re.match(r"[(\[]([A-Za-z])[)\]]|([A-Za-z])[.:)](?=\s|$)", s)
    if lead:
        letter = (lead.group(1) or lead.group(2)).upper()
        if letter in letters:
            return letter
    tokens = s.split()
    found: set[str] = set()
    for k, token in enumerate(tokens):
        core = token.strip(".,:;!?\"'*")
        m = re.fullmatch(r"[(\[]([A-Za-z])[)\]]|([A-Z])", core)
        if not m:
            continue
        letter = (m.group(1) or m.group(2)).upper()
        if letter not in letters:
            continue
        if m.group(2) == "A" and core == token and k + 1 < len(tokens):
            nxt = tokens[k + 1]
            if nxt[:1].islower() and nxt.strip(".,:;!?").lower() not in _NOT_ARTICLE_NEXT:
                continue  # "A dog ..." -- an article, not option A
        found.add(letter)
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        return ""
    if choices:
        norm = _norm_option(s)
        hits = []
        for letter, option in choices.items():
            option_norm = _norm_option(option)
            if option_norm and re.search(rf"(?<!\w){re.escape(option_norm)}(?!\w)", norm):
                hits.append(letter)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            exact = [h for h in hits if _norm_option(choices[h]) == norm]
            if len(exact) == 1:
                return exact[0]
            longest = max(hits, key=lambda h: len(_norm_option(choices[h])))
            if all(_norm_option(choices[h]) in _norm_option(choices[longest]) for h in hits):
                return longest
            return ""
    return None


def extract_choice(text: Any, choices: dict[str, str] | Sequence[str] | str | None = None) -> str:
    """The option letter a generated text picks, or "" when none can be told (nothing found, or ambiguous).

    `choices`: {letter: option text}, a list of option texts (lettered A, B, ...), or just the valid letters
    ("ABCD", the default). Handles "B", "(B)", "b.", "B. cat", "b) Closed", "The answer is B.", "Answer: (c)",
    a rationale followed by "so the answer is C", and an option's text without its letter ("Closed").
    "A or B" and texts naming several options are ambiguous -> "".
    """
    if isinstance(choices, str):
        options: dict[str, str] = {}
        letters = {c.upper() for c in choices}
    else:
        if choices is not None and not isinstance(choices, dict):
            choices = {OPTION_LETTERS[i]: str(c) for i, c in enumerate(choices)}
        options = {str(k).upper(): str(v) for k, v in (choices or {}).items() if v is not None}
        letters = set(options) or set("ABCD")
    text = clean_generation(text)
    if not text:
        return ""
    for segment in answer_segments(text):
        for part in (_first_sentence(segment), segment):
            found = _choice_in(part, letters, options)
            if found is not None:
                return found
    found = _choice_in(text, letters, options)
    return found or ""


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def extract_yes_no(text: Any, strict: bool = False) -> str:
    """ "yes" / "no" from a generated text.

    A leading yes/no word (or one right after "the answer is") decides. Otherwise, as in the official POPE script,
    the first sentence is read: "no", "not" or a "n't" word -> "no", anything else -> "yes". With ``strict=True``
    (RefocusShapes) a text must contain exactly one of the words yes / no, else "" (unanswered). Empty text -> "".
    """
    text = clean_generation(text)
    if not text:
        return ""
    for segment in answer_segments(text):
        words = _words(segment)
        if words and words[0] in ("yes", "no"):
            return words[0]
    words = _words(text)
    if words and words[0] in ("yes", "no"):
        return words[0]
    if strict:
        kinds = {w for w in words if w in ("yes", "no")}
        return kinds.pop() if len(kinds) == 1 else ""
    first = _words(text.split(".")[0])
    if any(w in ("no", "not") or w.endswith("n't") for w in first):
        return "no"
    return "yes"


def _numbers(text: str) -> list[str]:
    out = []
    for token in re.findall(r"-?\d+(?:\.\d+)?|[A-Za-z]+", text):
        if token[0].isdigit() or token[0] == "-":
            plain_integer = "." not in token and not token.startswith("-")
            out.append((token.lstrip("0") or "0") if plain_integer else token)
        elif token.lower() in _NUMBER_WORDS:
            out.append(_NUMBER_WORDS[token.lower()])
    return out


def extract_number(text: Any) -> str:
    """The number a text answers with: the first number after "the answer is", else the only number in the text
    (digits or the words zero..twenty); "" when there is none or several different ones."""
    text = clean_generation(text)
    if not text:
        return ""
    for segment in answer_segments(text):
        numbers = _numbers(_first_sentence(segment))
        if numbers:
            return numbers[0]
    numbers = set(_numbers(text))
    return numbers.pop() if len(numbers) == 1 else ""


def extract_free_form(text: Any) -> str:
    """Normalised answer text: what follows the last "the answer is" (first sentence), else the whole text."""
    text = clean_generation(text)
    segments = answer_segments(text)
    return normalize_text(_first_sentence(segments[0]) if segments else text)


def colour_in(text: str, colours: Sequence[str]) -> str:
    """The one colour word `text` names ("" when it names none or several different ones)."""
    found = {word for word in re.findall(r"[a-z]+", text.lower()) if word in colours}
    return found.pop() if len(found) == 1 else ""


# ----------------------------------------------------------------------------------------------------------------
# benchmark values


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def as_text(value: Any) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def as_int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def as_letter(value: Any) -> str:
    """Gold option letter from "B", "(b)", "b", "(a) Open"."""
    text = as_text(value)
    m = re.match(r"\s*\(?([A-Za-z])\)?(?:[\s.:]|$)", text)
    return m.group(1).upper() if m else text.upper()


def options_prompt(choices: dict[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in choices.items())


def parse_inline_options(question: str) -> dict[str, str] | None:
    """Options spelled inside a question, MMStar style: "...\\nOptions: A: x, B: y, C: z" -> {"A": "x", ...}."""
    markers = list(re.finditer(r"options?\s*:\s*", question, re.IGNORECASE))
    marker = markers[-1] if markers else None
    tail = question[marker.end() :] if marker else question
    first = re.match(r"\s*\(?A\s*[:.)]\s*", tail)
    if not first:
        return None
    starts = [(first.start(), first.end())]
    for letter in OPTION_LETTERS[1:]:
        m = re.compile(rf"[,;\s]\s*\(?{letter}\s*[:.)]\s+").search(tail, starts[-1][1])
        if not m:
            break
        starts.append((m.start(), m.end()))
    if len(starts) < 2:
        return None
    options = {}
    for k, (_, end) in enumerate(starts):
        stop = starts[k + 1][0] if k + 1 < len(starts) else len(tail)
        options[OPTION_LETTERS[k]] = tail[end:stop].strip().rstrip(",;").strip()
    return options


def parse_mmvp_options(options: Any) -> dict[str, str]:
    """ "(a) Open (b) Closed" (or a list) -> {"A": "Open", "B": "Closed"}."""
    if isinstance(options, (list, tuple)):
        return {OPTION_LETTERS[i]: as_text(o) for i, o in enumerate(options)}
    text = as_text(options)
    found = re.findall(r"\(([a-zA-Z])\)\s*(.*?)(?=\s*\([a-zA-Z]\)|$)", text, re.DOTALL)
    return {letter.upper(): value.strip() for letter, value in found}


__all__ = [
    "OPTION_LETTERS",
    "answer_segments",
    "as_int",
    "as_letter",
    "as_text",
    "clean_generation",
    "colour_in",
    "extract_choice",
    "extract_free_form",
    "extract_number",
    "extract_yes_no",
    "is_missing",
    "normalize_text",
    "options_prompt",
    "parse_inline_options",
    "parse_mmvp_options",
]
