"""Training data loading: record formats, validation, and the collator."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from lare_hf.data.formats import LaReRecords, MalformedRecordError, load_records, records_from_dataset

datasets.disable_progress_bars()


def _png(path: Path, seed: int, size: int = 24) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(path)
    return path


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), mode="RGB").convert("L").save(buffer, "PNG")
    return buffer.getvalue()


def _write(path: Path, records: list[dict], fmt: str) -> str:
    if fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(records))
    elif fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif fmt == "disk":
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    else:
        raise AssertionError(fmt)
    return str(path)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    _png(tmp_path / "images" / "a.png", 0)
    _png(tmp_path / "images" / "b.png", 1)
    return tmp_path


def _conv(*turns: tuple[str, str], image: str | None = "images/a.png", id: str = "c") -> dict:
    record = {"id": id, "conversations": [{"from": role, "value": value} for role, value in turns]}
    if image is not None:
        record["image"] = image
    return record


def _reasoning(id: str = "r", image: str | None = "images/a.png", **fields) -> dict:
    record = {"id": id, "image": image, "question": "How many circles?", "rationale": "I count 2.", "answer": "2"}
    record.update(fields)
    return record


# ------------------------------------------------------------------------------------------------- conversations


def test_conversation_records_normalise(data_dir):
    records = [
        _conv(("human", "<image>\nWhat is shown?"), ("gpt", "A pattern."), id="before"),
        _conv(("human", "Describe this.\n<image>"), ("gpt", "Noise."), id="after", image="images/b.png"),
        _conv(
            ("user", "<image>\nFirst question?"),
            ("assistant", "First answer."),
            ("human", "Second question?"),
            ("gpt", "Second answer."),
            id="multi",
        ),
        _conv(("human", "Say hi."), ("gpt", "Hi."), image=None, id="text-only"),
        _conv(("human", "No token here."), ("gpt", "Fine."), id="no-token"),
    ]
    data = load_records(_write(data_dir / "conv", records, "json"))
    assert isinstance(data, LaReRecords)
    assert data.kind == "conversation" and len(data) == 5 and data.num_skipped == 0 and data.skipped == []

    before = data[0]
    assert before["id"] == "before" and before["answer"] == "A pattern." and before["rationale"] is None
    assert before["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
    ]
    assert isinstance(before["image"], Image.Image) and before["image"].mode == "RGB"
    assert before["image"].size == (32, 24)

    after = data[1]
    assert after["messages"][0]["content"] == [{"type": "text", "text": "Describe this."}, {"type": "image"}]

    multi = data[2]
    assert multi["answer"] == "Second answer."
    assert multi["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First question?"}]},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": [{"type": "text", "text": "Second question?"}]},
    ]

    text_only = data[3]
    assert text_only["image"] is None
    assert text_only["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]

    # an image without an <image> token goes before the text (LLaVA's convention)
    assert data[4]["messages"][0]["content"][0] == {"type": "image"}
    assert data[-1]["id"] == "no-token"
    assert data.without_image == [3]


def test_image_folder_absolute_paths_and_default_ids(data_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    absolute = str((data_dir / "images" / "b.png").resolve())
    records = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {
            "image": absolute,
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "B"}],
        },
    ]
    path = _write(elsewhere / "conv", records, "jsonl")
    data = load_records(path, image_folder=str(data_dir / "images"))
    assert [data[i]["answer"] for i in range(2)] == ["A", "B"]
    assert data[0]["id"] == "conv.jsonl:0" and data[1]["id"] == "conv.jsonl:1"
    # without image_folder, "a.png" is looked up beside the data file, where it is not
    with pytest.raises(MalformedRecordError, match="record 0.*does not exist.*image_folder"):
        load_records(path)


# ------------------------------------------------------------------------------------------------- reasoning


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "disk"])
def test_reasoning_records_in_every_file_format(data_dir, fmt):
    records = [_reasoning("r0"), _reasoning("r1", image="images/b.png", rationale="Two shapes.", answer="3")]
    data = load_records(_write(data_dir / "reasoning", records, fmt))
    assert data.kind == "reasoning" and len(data) == 2
    example = data[1]
    assert example == {
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}],
        "answer": "3",
        "rationale": "Two shapes.",
        "image": example["image"],
        "id": "r1",
    }
    assert example["image"].mode == "RGB" and example["image"].size == (32, 24)
    assert data.without_rationale == []
    data.require_rationales()


def test_embedded_images(data_dir):
    # a datasets Image() column (what the synthetic benchmark builds in memory) ...
    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.open(data_dir / "images" / "a.png"), Image.open(data_dir / "images" / "b.png")],
            "question": ["q0", "q1"],
            "rationale": ["r0", "r1"],
            "answer": ["a0", "a1"],
        },
        features=datasets.Features(
            image=datasets.Image(),
            question=datasets.Value("string"),
            rationale=datasets.Value("string"),
            answer=datasets.Value("string"),
        ),
    )
    data = records_from_dataset(datasets.DatasetDict(train=ds))
    assert len(data) == 2 and data[0]["image"].size == (32, 24) and data[1]["answer"] == "a1"
    assert data[0]["id"] == "dataset:0"

    # ... written to parquet (bytes embedded) ...
    path = data_dir / "embedded.parquet"
    ds.to_parquet(str(path))
    assert load_records(str(path))[1]["image"].mode == "RGB"

    # ... and raw {"bytes", "path"} dicts (grayscale PNG bytes come back as RGB)
    raw = datasets.Dataset.from_list(
        [
            _reasoning("b0", image={"bytes": _png_bytes(3), "path": None}),
            _reasoning("b1", image={"bytes": None, "path": str(data_dir / "images" / "a.png")}),
        ]
    )
    data = records_from_dataset(raw)
    assert data[0]["image"].mode == "RGB" and data[0]["image"].size == (16, 16)
    assert data[1]["image"].size == (32, 24)


def test_dataset_dict_folder_split(data_dir):
    folder = data_dir / "dd"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list([_reasoning("t0"), _reasoning("t1")]),
        test=datasets.Dataset.from_list([_reasoning("e0")]),
    ).save_to_disk(str(folder))
    assert [x["id"] for x in load_records(str(folder))] == ["t0", "t1"]
    assert [x["id"] for x in load_records(str(folder), split="test")] == ["e0"]
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_records(str(folder), split="dev")


def test_choices_are_added_unless_already_in_the_question(data_dir):
    records = [
        _reasoning("c0", choices=["red", "blue"], question="Which color?"),
        _reasoning("c1", choices=["red", "blue"], question="Which color? (A) red (B) blue"),
        _reasoning("c2", choices=["1", "2"], question="How many? 1 or 2"),
        _reasoning("c3", choices={"A": "x", "B": "y", "C": None}, question="Pick.\nA. x\nB. y"),
    ]
    data = load_records(_write(data_dir / "choices", records, "jsonl"))
    assert data[0]["messages"][0]["content"][1]["text"] == "Which color?\nOptions:\nA. red\nB. blue"
    assert data[1]["messages"][0]["content"][1]["text"] == "Which color? (A) red (B) blue"
    assert data[2]["messages"][0]["content"][1]["text"] == "How many? 1 or 2\nOptions:\nA. 1\nB. 2"
    assert data[3]["messages"][0]["content"][1]["text"] == "Pick.\nA. x\nB. y"


def test_missing_rationale_is_allowed_but_reported(data_dir):
    records = [_reasoning("r0"), _reasoning("r1", rationale=None)]
    data = load_records(_write(data_dir / "norat", records, "json"))
    assert data[1]["rationale"] is None and data.without_rationale == [1]
    with pytest.raises(ValueError, match="1 of 2 records have no rationale.*'r1'"):
        data.require_rationales()


# ------------------------------------------------------------------------------------------------- detection


def test_kind_detection(data_dir):
    conv = _write(data_dir / "c", [_conv(("human", "<image>\nQ"), ("gpt", "A"))], "jsonl")
    reasoning = _write(data_dir / "r", [_reasoning()], "jsonl")
    assert load_records(conv).kind == "conversation"
    assert load_records(reasoning).kind == "reasoning"
    assert load_records(reasoning, kind="reasoning").kind == "reasoning"
    other = _write(data_dir / "o", [{"text": "hello"}], "jsonl")
    with pytest.raises(ValueError, match="Cannot detect the record format.*kind="):
        load_records(other)
    # the wrong explicit kind: every record lacks the fields
    with pytest.raises(MalformedRecordError, match="record 0: field 'conversations': is missing"):
        load_records(reasoning, kind="conversation")


def test_bad_paths_and_arguments(data_dir):
    with pytest.raises(FileNotFoundError):
        load_records(str(data_dir / "nope.json"))
    (data_dir / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="extension"):
        load_records(str(data_dir / "data.csv"))
    with pytest.raises(ValueError, match="save_to_disk"):
        load_records(str(data_dir / "images"))
    good = _write(data_dir / "g", [_reasoning()], "json")
    with pytest.raises(ValueError, match="on_error"):
        load_records(good, on_error="ignore")
    (data_dir / "broken.json").write_text("[{not json")
    with pytest.raises(ValueError, match="Could not read"):
        load_records(str(data_dir / "broken.json"))


# ------------------------------------------------------------------------------------------------- malformed


MALFORMED = {
    "no conversations": ({"id": "x", "image": "images/a.png"}, "conversations", "is missing"),
    "empty conversations": (_conv(), "conversations", "is empty"),
    "ends with human": (
        _conv(("human", "<image>\nQ"), ("gpt", "A"), ("human", "more?")),
        "conversations[2].from",
        "does not end with a gpt turn",
    ),
    "no human turn": (_conv(("gpt", "A")), "conversations", "no human turn"),
    "starts with gpt": (_conv(("gpt", "hello"), ("human", "Q"), ("gpt", "A")), "conversations[0].from", "not a human"),
    "unknown role": (_conv(("human", "Q"), ("system", "x"), ("gpt", "A")), "conversations[1].from", "'system'"),
    "value not a string": (_conv(("human", "Q"), ("gpt", 5)), "conversations[1].value", "has type int"),
    "conversations not a list": ({"id": "x", "conversations": "Q? A."}, "conversations", "has type str"),
    "token without image": (_conv(("human", "<image>\nQ"), ("gpt", "A"), image=None), "image", "is missing"),
    "two image tokens": (_conv(("human", "<image><image>\nQ"), ("gpt", "A")), "conversations[0].value", "2 <image>"),
    "missing image file": (
        _conv(("human", "<image>\nQ"), ("gpt", "A"), image="images/zzz.png"),
        "image",
        "does not exist",
    ),
    "corrupt image file": (
        _conv(("human", "<image>\nQ"), ("gpt", "A"), image="images/corrupt.png"),
        "image",
        "cannot read",
    ),
    "image wrong type": (_conv(("human", "<image>\nQ"), ("gpt", "A"), image=7), "image", "has type int"),
}

MALFORMED_REASONING = {
    "no answer": (_reasoning(answer=None), "answer", "is missing"),
    "empty answer": (_reasoning(answer="  "), "answer", "is empty"),
    "no question": (_reasoning(question=None), "question", "is missing"),
    "question wrong type": (_reasoning(question=["a", "b"]), "question", "has type list"),
    "rationale wrong type": (_reasoning(rationale={"a": 1}), "rationale", "has type dict"),
    "choices wrong type": (_reasoning(choices="A or B"), "choices", "has type str"),
    "no image": (_reasoning(image=None), "image", "is missing"),
    "missing image file": (_reasoning(image="images/missing.png"), "image", "does not exist"),
}


def _check_malformed(data_dir, good: dict, bad: dict, field: str, reason: str, fmt: str, caplog):
    (data_dir / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    path = _write(data_dir / "bad", [good, bad, good], fmt)
    with pytest.raises(MalformedRecordError) as info:
        load_records(path)
    error = info.value
    assert error.index == 1 and error.field == field and reason in error.reason
    message = str(error)
    assert path in message and "record 1" in message and repr(field) in message
    assert "To fix" in message and "on_error='skip'" in message

    with caplog.at_level(logging.WARNING, logger="lare_hf.data.formats"):
        data = load_records(path, on_error="skip")
    assert len(data) == 2 and data.num_skipped == 1 and data.skipped[0][0] == 1 and reason in data.skipped[0][1]
    assert data.source_indices == [0, 2]
    assert "skipped 1 malformed record(s) of 3" in caplog.text


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_conversations(data_dir, case, caplog):
    bad, field, reason = MALFORMED[case]
    good = _conv(("human", "<image>\nQ"), ("gpt", "A"))
    _check_malformed(data_dir, good, bad, field, reason, "jsonl", caplog)


@pytest.mark.parametrize("case", list(MALFORMED_REASONING))
def test_malformed_reasoning(data_dir, case, caplog):
    bad, field, reason = MALFORMED_REASONING[case]
    _check_malformed(data_dir, _reasoning(), bad, field, reason, "json", caplog)


def test_corrupt_embedded_image_and_all_bad(data_dir, caplog):
    raw = datasets.Dataset.from_list(
        [
            _reasoning("ok", image={"bytes": _png_bytes(1), "path": None}),
            _reasoning("bad", image={"bytes": b"garbage", "path": None}),
        ]
    )
    with pytest.raises(MalformedRecordError, match="record 1: field 'image': cannot read embedded image bytes"):
        records_from_dataset(raw)
    assert records_from_dataset(raw, on_error="skip").num_skipped == 1
    all_bad = datasets.Dataset.from_list([_reasoning(answer=None), _reasoning(answer=None)])
    with pytest.raises(ValueError, match="all 2 records are malformed"):
        records_from_dataset(all_bad, on_error="skip")


# ------------------------------------------------------------------------------------------------- collator

K, M = 2, 2


@pytest.fixture(scope="module")
def processor():
    from lare_hf.processing.processing_lare import build_processor
    from lare_hf.processing.tokenization import build_tiny_tokenizer

    return build_processor(
        build_tiny_tokenizer(),
        image_size=32,
        image_seq_length=4,
        num_latent_steps=K,
        latent_tokens_per_step=M,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


@pytest.fixture
def reasoning_records(data_dir) -> LaReRecords:
    records = [
        _reasoning("r0", answer="2", rationale="I count two circles."),
        _reasoning(
            "r1",
            image="images/b.png",
            question="Which shape is largest?",
            answer="the red square",
            rationale="The square spans most of the image.",
        ),
    ]
    return load_records(_write(data_dir / "reasoning", records, "jsonl"))


def _answer_text(processor, batch, row: int) -> str:
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != -100])


def test_collator_batch(processor, reasoning_records):
    from lare_hf.data.collator import LaReDataCollator

    features = [reasoning_records[0], reasoning_records[1]]
    batch = LaReDataCollator(processor=processor, max_rationale_length=6)(features)
    assert isinstance(batch, dict)
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "pixel_values",
        "rationale_input_ids",
        "rationale_attention_mask",
    }
    n, length = batch["input_ids"].shape
    assert n == 2 and batch["attention_mask"].shape == (2, length) and batch["labels"].shape == (2, length)
    assert tuple(batch["pixel_values"].shape) == (2, 3, 32, 32)
    assert batch["rationale_input_ids"].shape == batch["rationale_attention_mask"].shape
    assert batch["rationale_input_ids"].shape[0] == 2 and batch["rationale_input_ids"].shape[1] <= 6
    # labels only on the response (rationale, then the answer, and its closing <|im_end|>), equal to the ids there
    for row, feature in enumerate(features):
        expected = f"{feature['rationale']}\nAnswer: {feature['answer']}<|im_end|>"
        assert _answer_text(processor, batch, row) == expected
        supervised = batch["labels"][row] != -100
        assert (batch["input_ids"][row][supervised] == batch["labels"][row][supervised]).all()
        assert (batch["attention_mask"][row][supervised] == 1).all()
        ids = batch["input_ids"][row].tolist()
        assert ids.count(processor.latent_token_id) == K * M and ids.count(processor.image_token_id) == 4
    rationale = batch["rationale_input_ids"][0][batch["rationale_attention_mask"][0] == 1]
    assert processor.tokenizer.decode(rationale) == processor.tokenizer.decode(
        processor.tokenizer("I count two circles.", add_special_tokens=False)["input_ids"][:6]
    )


def test_collator_options(processor, reasoning_records, data_dir):
    from torch.utils.data import DataLoader

    from lare_hf.data.collator import LaReDataCollator

    features = [reasoning_records[0], reasoning_records[1]]
    # stage I: no latent slots, no rationale
    plain = LaReDataCollator(processor=processor, num_latent_steps=0, with_rationale=False)(features)
    assert "rationale_input_ids" not in plain and processor.latent_token_id not in plain["input_ids"]
    # the paper's target (default): rationale, then the answer; explicit CoT baseline = the same without latents
    cot = LaReDataCollator(processor=processor, num_latent_steps=0, with_rationale=False)(features)
    assert "rationale_input_ids" not in cot
    assert _answer_text(processor, cot, 1) == "The square spans most of the image.\nAnswer: the red square<|im_end|>"
    lare = LaReDataCollator(processor=processor)(features)
    assert "rationale_input_ids" in lare
    assert _answer_text(processor, lare, 1) == _answer_text(processor, cot, 1)
    # short-answer target
    answer_only = LaReDataCollator(processor=processor, response_format="answer")(features)
    assert _answer_text(processor, answer_only, 1) == "the red square<|im_end|>"
    with pytest.raises(ValueError, match="response_format must be one of.*'essay'"):
        LaReDataCollator(processor=processor, response_format="essay")
    # answer truncation
    short = LaReDataCollator(processor=processor, with_rationale=False, max_answer_length=2)(features)
    assert ((short["labels"] != -100).sum(dim=1) <= 2).all()
    # works as a DataLoader collate_fn over LaReRecords (what Trainer does)
    loader = DataLoader(reasoning_records, batch_size=2, collate_fn=LaReDataCollator(processor=processor))
    assert next(iter(loader))["input_ids"].shape[0] == 2


def test_collator_missing_rationale(processor, data_dir):
    from lare_hf.data.collator import LaReDataCollator

    records = load_records(_write(data_dir / "nr", [_reasoning("has"), _reasoning("lacks", rationale=None)], "json"))
    features = [records[0], records[1]]
    # a sample without a rationale gets an all-0 rationale row: the model leaves it out of L_sym-text / L_text
    with_rationale = LaReDataCollator(processor=processor)(features)
    assert with_rationale["rationale_attention_mask"][0].sum() > 0
    assert with_rationale["rationale_attention_mask"][1].sum() == 0
    batch = LaReDataCollator(processor=processor, with_rationale=False)(features)
    assert "rationale_input_ids" not in batch
    # a record without rationale is trained on its bare answer, one with a rationale on the reasoning
    assert _answer_text(processor, batch, 1) == "2<|im_end|>"
    assert _answer_text(processor, batch, 0) == "I count 2.\nAnswer: 2<|im_end|>"


def test_collator_conversations_text_only_and_mixed(processor, data_dir):
    from lare_hf.data.collator import LaReDataCollator

    records = load_records(
        _write(
            data_dir / "conv",
            [
                _conv(("human", "Say hi."), ("gpt", "Hi."), image=None, id="t0"),
                _conv(("human", "Count."), ("gpt", "One."), ("human", "Again?"), ("gpt", "Two."), image=None, id="t1"),
                _conv(("human", "<image>\nWhat?"), ("gpt", "Noise."), id="i0"),
            ],
            "json",
        )
    )
    collator = LaReDataCollator(processor=processor, with_rationale=False)
    text_batch = collator([records[0], records[1]])
    assert "pixel_values" not in text_batch
    assert _answer_text(processor, text_batch, 1) == "Two.<|im_end|>"
    prompt = processor.tokenizer.decode(text_batch["input_ids"][1][text_batch["labels"][1] == -100])
    assert "One." in prompt and "Again?" in prompt and "Count." in prompt
    assert processor.image_token_id not in text_batch["input_ids"]
    image_batch = collator([records[2]])
    assert image_batch["pixel_values"].shape[0] == 1
    # image and text-only examples batch together: the text-only prompt has no latent region
    mixed = collator([records[0], records[2]])
    assert mixed["pixel_values"].shape[0] == 1
    ids = mixed["input_ids"]
    assert processor.latent_start_token_id not in ids[0] and processor.latent_start_token_id in ids[1]
    assert processor.image_token_id not in ids[0] and processor.image_token_id in ids[1]
    assert _answer_text(processor, mixed, 0) == "Hi.<|im_end|>"
