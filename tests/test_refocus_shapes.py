"""The synthetic RefocusShapes benchmark: determinism, held-out rules, question types, the written JSONL."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import datasets
import numpy as np
import pytest
from PIL import Image

from lare_hf.data.refocus_shapes import (
    CATEGORIES,
    DIGIT_SPLIT_INDEX,
    RESERVED_COMBOS,
    generate_refocus_shapes,
    verify_held_out,
    write_refocus_shapes,
)


@pytest.fixture(scope="module")
def shapes() -> datasets.DatasetDict:
    return generate_refocus_shapes(num_train=28, num_test=21, seed=0)


def raw(split: datasets.Dataset) -> list[dict]:
    return split.cast_column("image", datasets.Image(decode=False)).to_list()


def test_schema(shapes):
    assert set(shapes) == {"train", "test"}
    assert len(shapes["train"]) == 28 and len(shapes["test"]) == 21
    assert isinstance(shapes["train"].features["image"], datasets.Image)
    for name in ("id", "question", "rationale", "answer", "choices", "category", "pair_id", "digit_ids", "combos"):
        assert name in shapes["train"].column_names
    row = shapes["train"][0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert len(set(shapes["train"]["id"])) == 28
    assert generate_refocus_shapes(2, 0, image_size=96)["train"][0]["image"].size == (96, 96)


def test_deterministic_by_seed(shapes):
    again = generate_refocus_shapes(num_train=28, num_test=21, seed=0)
    for split in ("train", "test"):
        assert raw(again[split]) == raw(shapes[split])  # same text, metadata and PNG bytes
    other = generate_refocus_shapes(num_train=28, num_test=21, seed=1)
    assert raw(other["train"]) != raw(shapes["train"])
    assert [r["image"]["bytes"] for r in raw(other["test"])] != [r["image"]["bytes"] for r in raw(shapes["test"])]
    # Splits draw from independent streams: the train split does not depend on num_test.
    assert raw(generate_refocus_shapes(28, 3, seed=0)["train"]) == raw(shapes["train"])


def test_held_out_rules(shapes):
    summary = verify_held_out(shapes)
    assert set(summary["test_combos_unseen_in_train"]) >= set(RESERVED_COMBOS)
    train_ids = {i for ids in shapes["train"]["digit_ids"] for i in ids}
    test_ids = {i for ids in shapes["test"]["digit_ids"] for i in ids}
    assert not train_ids & test_ids
    assert max(train_ids) < DIGIT_SPLIT_INDEX <= min(test_ids)
    assert not {c for combos in shapes["train"]["combos"] for c in combos} & set(RESERVED_COMBOS)
    assert all(set(combos) & set(RESERVED_COMBOS) for combos in shapes["test"]["combos"])

    leaked = {"train": shapes["train"].to_list(), "test": shapes["test"].to_list()}
    leaked["train"][0] = {**leaked["train"][0], "combos": ["yellow square", "red circle"]}
    with pytest.raises(ValueError, match="reserved"):
        verify_held_out(leaked)
    leaked = {"train": shapes["train"].to_list(), "test": shapes["test"].to_list()}
    leaked["test"][0] = {**leaked["test"][0], "digit_ids": [5]}
    with pytest.raises(ValueError, match="outside the test pool"):
        verify_held_out(leaked)


def test_every_category_and_answer_format(shapes):
    for split in ("train", "test"):
        assert set(shapes[split]["category"]) == set(CATEGORIES)
    for row in shapes["train"].remove_columns("image").to_list() + shapes["test"].remove_columns("image").to_list():
        assert row["rationale"].endswith(f"So the answer is {row['answer']}.")
        assert len(row["digit_ids"]) == len(row["combos"]) and 2 <= len(row["combos"]) <= 4
        assert len(set(row["combos"])) == len(row["combos"])
        if row["category"] == "multiple_choice":
            assert len(row["choices"]) == 4 and row["answer"] in "ABCD"
            for letter, option in zip("ABCD", row["choices"]):
                assert f"\n{letter}. {option}" in row["question"]
            digit = re.search(r"contains the digit (\d)", row["rationale"]).group(1)
            assert row["choices"]["ABCD".index(row["answer"])] == digit
        else:
            assert row["choices"] == []
        if row["category"] in ("exists", "minimal_pair"):
            assert row["answer"] in ("yes", "no")
        elif row["category"] != "multiple_choice":
            assert row["answer"].isdigit()
        assert (row["pair_id"] >= 0) == (row["category"] == "minimal_pair")


def test_minimal_pairs_flip(shapes):
    for split in ("train", "test"):
        pairs = defaultdict(list)
        for row in shapes[split].remove_columns("image").to_list():
            if row["pair_id"] >= 0:
                pairs[row["pair_id"]].append(row)
        assert pairs
        for members in pairs.values():
            assert len(members) == 2
            a, b = members
            assert a["question"] == b["question"] and a["combos"] == b["combos"]
            assert {a["answer"], b["answer"]} == {"yes", "no"}
            scene_a, scene_b = json.loads(a["scene"]), json.loads(b["scene"])
            changed = [k for k, (x, y) in enumerate(zip(scene_a, scene_b)) if x != y]
            assert len(changed) == 1  # exactly one container differs ...
            x, y = scene_a[changed[0]], scene_b[changed[0]]
            assert x["digit"] != y["digit"] and {**x, "digit": 0, "digit_id": 0} == {**y, "digit": 0, "digit_id": 0}


def test_images_show_containers(shapes):
    row = shapes["test"][0]
    pixels = np.asarray(row["image"])
    for x0, y0, x1, y1 in row["regions"]:
        patch = pixels[y0:y1, x0:x1]
        assert patch.min() < 60  # the handwritten digit's dark ink lies inside the container


def test_jsonl_round_trip(tmp_path, shapes):
    paths = write_refocus_shapes(tmp_path, num_train=28, num_test=21, seed=0)
    assert set(paths) == {"train", "test"}
    loaded = datasets.load_dataset("json", data_files=paths)
    for split in ("train", "test"):
        generated = shapes[split]
        assert len(loaded[split]) == len(generated)
        for column in (
            "id",
            "question",
            "rationale",
            "answer",
            "choices",
            "category",
            "pair_id",
            "digit_ids",
            "combos",
        ):
            assert loaded[split][column] == generated[column], column
        first = loaded[split][0]["image"]
        assert first.startswith("images/")
        on_disk = np.asarray(Image.open(tmp_path / first).convert("RGB"))
        assert (on_disk == np.asarray(generated[0]["image"])).all()
    assert verify_held_out({split: loaded[split] for split in ("train", "test")})


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        generate_refocus_shapes(1, 1, image_size=16)
    with pytest.raises(ValueError, match=">= 0"):
        generate_refocus_shapes(-1, 1)


def test_written_files_load_as_reasoning_records(tmp_path):
    from lare_hf.data.formats import load_records

    paths = write_refocus_shapes(tmp_path, num_train=7, num_test=0, seed=0)
    records = load_records(paths["train"], kind="reasoning")
    assert len(records) == 7
    mc = next(r for r in records if r["answer"] in ("A", "B", "C", "D"))
    assert "Options:" not in mc["messages"][0]["content"][-1]["text"]  # options already listed in the question
    assert records[0]["rationale"].endswith(f"So the answer is {records[0]['answer']}.")
