"""One training record -> the normalised example (see `lare_hf.data.formats` for the two record formats and the
example structure): the conversation and reasoning rules, the multiple-choice text (`question_with_choices`, which
evaluation shares), and the checks that name the field and the fix of a malformed record."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .files import ImageRef, ImageReferenceError, image_reference

IMAGE_TOKEN = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class MalformedRecordError(ValueError):
    """A record that cannot be used for training: names the source, the record index, the field and the fix."""

    def __init__(self, source: str, index: int, field: str, reason: str, fix: str):
        self.source, self.index, self.field, self.reason, self.fix = source, index, field, reason, fix
        super().__init__(
            f"{source}: record {index}: field {field!r}: {reason}. To fix: {fix}; or pass on_error='skip' to drop "
            "malformed records (they are counted and logged)."
        )


class RecordProblem(Exception):
    """What is wrong with one record: the field, the reason and the fix (`lare_hf.data.formats` turns it into a
    `MalformedRecordError` or a skip reason)."""

    def __init__(self, field: str, reason: str, fix: str):
        super().__init__(f"field {field!r}: {reason}")
        self.field, self.reason, self.fix = field, reason, fix


def _image_reference(value: Any, root: Path | None) -> ImageRef | None:
    try:
        return image_reference(value, root)
    except ImageReferenceError as error:
        raise RecordProblem("image", error.reason, error.fix) from None


# ----------------------------------------------------------------------------------------------------------------
# normalisation of one record


def _text_field(row: dict, name: str, required: bool, allow_numbers: bool = False) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise RecordProblem(name, "is missing", f"add a non-empty string {name!r} to the record")
        return None
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RecordProblem(name, f"has type {type(value).__name__}, expected a string", f"store {name!r} as a string")
    if not value.strip():
        if required:
            raise RecordProblem(name, "is empty", f"give {name!r} a non-empty string")
        return None
    return value


def _user_content(text: str, image_here: bool, turn: int) -> list[dict]:
    """Content parts of a user turn; `<image>` decides where the image part goes (default: before the text)."""
    count = text.count(IMAGE_TOKEN)
    if count > 1:
        raise RecordProblem(
            f"conversations[{turn}].value",
            f"has {count} {IMAGE_TOKEN} tokens",
            "keep one <image> token (multi-image records are not supported)",
        )
    if count == 0:
        parts = [{"type": "image"}] if image_here else []
        return parts + [{"type": "text", "text": text}]
    before, after = text.split(IMAGE_TOKEN)
    before, after = before.rstrip(), after.lstrip()
    parts = [{"type": "text", "text": before}] if before else []
    parts.append({"type": "image"})
    if after:
        parts.append({"type": "text", "text": after})
    return parts


def _turns(value: Any) -> list[dict]:
    if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        # datasets' `Sequence(dict)` feature gives a dict of lists
        keys = list(value)
        value = [dict(zip(keys, items)) for items in zip(*value.values())] if keys else []
    if not isinstance(value, list):
        raise RecordProblem(
            "conversations", f"has type {type(value).__name__}, expected a list of turns", "store a list"
        )
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordProblem(
                f"conversations[{i}]", f"is a {type(turn).__name__}", 'use {"from": ..., "value": ...}'
            )
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in USER_ROLES + ASSISTANT_ROLES:
            raise RecordProblem(
                f"conversations[{i}].from",
                f"has role {role!r}",
                "use 'human'/'user' or 'gpt'/'assistant'",
            )
        if not isinstance(text, str):
            raise RecordProblem(
                f"conversations[{i}].value",
                "is missing" if text is None else f"has type {type(text).__name__}, expected a string",
                "give every turn a string 'value'",
            )
        turns.append({"role": "user" if role in USER_ROLES else "assistant", "text": text})
    return turns


def _normalise_conversation(row: dict, has_image: bool) -> dict:
    if row.get("conversations") is None:
        raise RecordProblem("conversations", "is missing", "add a list of human/gpt turns ending with a gpt turn")
    turns = _turns(row["conversations"])
    if not turns:
        raise RecordProblem("conversations", "is empty", "add human/gpt turns ending with a gpt turn")
    if not any(t["role"] == "user" for t in turns):
        raise RecordProblem("conversations", "has no human turn", "add a human turn before the gpt answer")
    if turns[0]["role"] != "user":
        raise RecordProblem("conversations[0].from", "is not a human turn", "start the conversation with a human turn")
    if turns[-1]["role"] != "assistant":
        raise RecordProblem(
            f"conversations[{len(turns) - 1}].from",
            "the conversation does not end with a gpt turn",
            "end it with the gpt answer to train on (drop trailing human turns)",
        )
    if not turns[-1]["text"].strip():
        raise RecordProblem(
            f"conversations[{len(turns) - 1}].value", "the final gpt answer is empty", "give an answer"
        )
    marked = [i for i, t in enumerate(turns) if IMAGE_TOKEN in t["text"]]
    for i in marked:
        if turns[i]["role"] != "user":
            raise RecordProblem(
                f"conversations[{i}].value", f"a gpt turn has {IMAGE_TOKEN}", "put <image> in a human turn"
            )
    if len(marked) > 1:
        raise RecordProblem(
            f"conversations[{marked[1]}].value",
            f"{IMAGE_TOKEN} appears in several turns",
            "keep one <image> token (multi-image records are not supported)",
        )
    if marked and not has_image:
        raise RecordProblem(
            "image",
            f"is missing but conversations[{marked[0]}] has {IMAGE_TOKEN}",
            "add the record's image, or remove the <image> token for a text-only record",
        )
    image_turn = (marked[0] if marked else 0) if has_image else None
    messages = []
    for i, turn in enumerate(turns[:-1]):
        if turn["role"] == "user":
            messages.append({"role": "user", "content": _user_content(turn["text"], i == image_turn, i)})
        else:
            messages.append({"role": "assistant", "content": turn["text"]})
    return {
        "messages": messages,
        "answer": turns[-1]["text"],
        "rationale": _text_field(row, "rationale", required=False),
    }


def _choice_items(choices: Any) -> list[tuple[str, str]]:
    """(letter, text) pairs of a list (lettered A, B, ...) or a {letter: text} dict of options."""
    if isinstance(choices, dict):
        items = [(str(key), value) for key, value in choices.items() if value is not None]
    elif isinstance(choices, (list, tuple)):
        items = [(chr(ord("A") + i), value) for i, value in enumerate(choices)]
    else:
        raise RecordProblem("choices", f"has type {type(choices).__name__}", "store a list of option strings")
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for _, v in items):
        raise RecordProblem("choices", "holds non-string options", "store a list of option strings")
    return [(letter, str(value)) for letter, value in items]


def format_choices(choices: Any) -> str:
    """Multiple-choice options as appended to a reasoning question: "Options:\nA. ...\nB. ..."."""
    try:
        items = _choice_items(choices)
    except RecordProblem as problem:
        raise TypeError(f"choices {problem.reason}") from None
    return _options_block(items)


def _options_block(items: list[tuple[str, str]]) -> str:
    return "Options:\n" + "\n".join(f"{letter}. {text}" for letter, text in items)


def _question_lists_choices(question: str, items: list[tuple[str, str]]) -> bool:
    """Whether the question already spells out every option with its letter ("A. red", "(A) red", "A) red", ...)."""
    return all(
        re.search(rf"(?<![A-Za-z0-9])\(?{re.escape(letter)}[.):]\s*{re.escape(text)}", question)
        for letter, text in items
    )


def _with_choices(question: str, items: list[tuple[str, str]]) -> str:
    # Questions that already spell their options out (as Vision-R1's do) are left as they are.
    if not items or _question_lists_choices(question, items):
        return question
    return f"{question.rstrip()}\n{_options_block(items)}"


def question_with_choices(question: str, choices: Any) -> str:
    """The text of a multiple-choice question as the model is asked it, in training (reasoning records) and in
    evaluation (`RefocusShapesBenchmark`) alike: the question, then "Options:\nA. ...\nB. ..." from `choices` (a
    list lettered A, B, ... or a {letter: text} dict), unless the question already spells out every option with its
    letter ("A. red", "(A) red", "A) red", ...). No choices: the question as it is."""
    try:
        items = _choice_items(choices)
    except RecordProblem as problem:
        raise TypeError(f"choices {problem.reason}") from None
    return _with_choices(question, items)


def _normalise_reasoning(row: dict, has_image: bool) -> dict:
    question = _text_field(row, "question", required=True)
    answer = _text_field(row, "answer", required=True, allow_numbers=True)
    rationale = _text_field(row, "rationale", required=False)
    if not has_image:
        raise RecordProblem("image", "is missing", "add the record's image (reasoning records need one)")
    if row.get("choices") is not None:
        question = _with_choices(question, _choice_items(row["choices"]))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return {"messages": messages, "answer": answer, "rationale": rationale}


def _check_inside(path: Path, confine_to: Path) -> None:
    """An image path of a dataset must resolve inside its image folder (symlinks followed), so that a dataset
    cannot make training read arbitrary files of the machine."""
    resolved, folder = path.resolve(), confine_to.resolve()
    if resolved != folder and folder not in resolved.parents:
        raise RecordProblem(
            "image",
            f"path {str(path)!r} resolves to {resolved}, outside the image folder {folder}",
            "keep the images under that folder, give the folder that holds them (image_folder=... / --image_folder), "
            "or, if you trust this dataset, allow_images_outside_root=True (--allow_images_outside_root True)",
        )


def normalise_record(
    row: dict, kind: str, root: Path | None, confine_to: Path | None = None
) -> tuple[dict, ImageRef | None]:
    """One raw record -> (example without the decoded image, image reference); raises RecordProblem. With
    `confine_to`, an image path must resolve inside that folder."""
    ref = _image_reference(row.get("image"), root)
    if ref is not None and ref[0] == "path" and confine_to is not None:
        _check_inside(ref[1], confine_to)
    if kind == "conversation":
        example = _normalise_conversation(row, ref is not None)
    else:
        example = _normalise_reasoning(row, ref is not None)
    return example, ref


__all__ = [
    "IMAGE_TOKEN",
    "MalformedRecordError",
    "RecordProblem",
    "format_choices",
    "normalise_record",
    "question_with_choices",
]
