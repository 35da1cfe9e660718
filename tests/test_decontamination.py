"""Issue 28 item 6: `lare data decontaminate` (Appendix B) on generated data with planted duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lare_hf.cli import main
from lare_hf.data.decontamination import ImageEmbedder, decontaminate, normalize_text, report_path

THRESHOLD = 0.995  # the tiny random CLIP puts the planted near-duplicate at ~0.9995, distinct scenes below 0.99


def scene(seed: int) -> Image.Image:
    """A coloured background with three rectangles: distinct seeds give distinct scenes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, 48, 2)
        width, height = rng.integers(8, 24, 2)
        draw.rectangle([x, y, x + width, y + height], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def near_duplicate(image: Image.Image) -> Image.Image:
    """The same scene resized down and up again, with a little Gaussian noise."""
    resized = np.asarray(image.resize((56, 56)).resize((64, 64))).astype(np.float32)
    noisy = resized + np.random.default_rng(0).normal(0, 4, resized.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_records(folder: Path, rows: list[tuple[dict, Image.Image]]) -> Path:
    (folder / "images").mkdir(parents=True)
    with open(folder / "data.jsonl", "w", encoding="utf-8") as handle:
        for row, image in rows:
            image.save(folder / row["image"])
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return folder / "data.jsonl"


def record(id_: str, question: str, answer: str, **extra) -> dict:
    return {"id": id_, "image": f"images/{id_}.png", "question": question, "answer": answer, **extra}


@pytest.fixture
def planted(tmp_path):
    """A benchmark set and a training set with one exact question-answer duplicate (other case, spacing and
    full-width letters), one near-duplicate image, and true negatives (same question with another answer, 3.5 vs
    35, distinct scenes)."""
    against = write_records(tmp_path / "bench", [
        (record("b0", "What colour is the   square?", "Red"), scene(0)),
        (record("b1", "How many circles are there?", "3"), scene(1)),
        (record("b2", "What is the length?", "3.5"), scene(2)),
    ])  # fmt: skip
    train = write_records(tmp_path / "train", [
        (record("t-text", "what colour is the square?", "ＲＥＤ", rationale="It is red."), scene(10)),
        (record("t-image", "Which shape is largest?", "The rectangle"), near_duplicate(scene(1))),
        (record("t-other-answer", "What colour is the square?", "Blue"), scene(5)),
        (record("t-punctuation", "What is the length?", "35"), scene(6)),
        (record("t-clean", "Is there a triangle?", "No"), scene(7)),
    ])  # fmt: skip
    return train, against


def test_normalisation_undoes_formatting_only():
    assert normalize_text("  What colour\n is the\tＳＱＵＡＲＥ? ") == "what colour is the square?"
    assert normalize_text("<image>\nStraße") == normalize_text("STRASSE")  # casefold, not lower()
    assert normalize_text("3.5") != normalize_text("35")  # punctuation carries content


def test_planted_duplicates_are_removed_and_reported(planted, tiny_parts, tmp_path):
    train, against = planted
    clip = str(tiny_parts[0] / "clip")
    output = tmp_path / "clean" / "train.jsonl"
    report = decontaminate(str(train), [str(against)], str(output), vision=clip, threshold=THRESHOLD, batch_size=2)

    kept = [json.loads(line) for line in output.read_text().splitlines()]
    original = {row["id"]: row for row in map(json.loads, train.read_text().splitlines())}
    assert [row["id"] for row in kept] == ["t-other-answer", "t-punctuation", "t-clean"]
    assert kept == [original[row["id"]] for row in kept]  # rows written unchanged
    assert report["num_train"] == 5 and report["num_kept"] == 3 and report["num_removed"] == 2
    assert report["removed_by_rule"] == {"text": 1, "image": 1}
    by_id = {entry["id"]: entry for entry in report["removed"]}
    assert by_id["t-text"]["rules"] == ["text"]
    assert by_id["t-text"]["text"] == {"against": str(against), "id": "b0"}
    assert by_id["t-text"]["index"] == 0
    assert by_id["t-image"]["rules"] == ["image"]
    assert by_id["t-image"]["image"]["id"] == "b1" and by_id["t-image"]["image"]["similarity"] > THRESHOLD
    assert report["against"] == [{"spec": str(against), "benchmark": None, "num_samples": 3, "num_images": 3}]
    assert "get_image_features" in report["embedding"]
    assert json.loads(report_path(output).read_text())["removed"] == report["removed"]


def test_true_negatives_stay_below_the_threshold(tiny_parts):
    """The test data is what it claims: the negatives' nearest benchmark image is well below THRESHOLD."""
    embedder = ImageEmbedder(str(tiny_parts[0] / "clip"), "cpu")
    bench = embedder([scene(0), scene(1), scene(2)])
    train = embedder([near_duplicate(scene(1)), scene(5), scene(6), scene(7), scene(10)])
    nearest = (train @ bench.T).max(dim=1).values
    assert nearest[0] > THRESHOLD
    assert (nearest[1:] < 0.99).all()


def test_text_rule_alone_and_benchmark_files(planted, tmp_path):
    train, against = planted
    output = tmp_path / "text_only.json"
    report = decontaminate(str(train), [str(against)], str(output), rules=("text",))
    assert [entry["id"] for entry in report["removed"]] == ["t-text"]
    assert [row["id"] for row in json.loads(output.read_text())] == [
        "t-image", "t-other-answer", "t-punctuation", "t-clean"
    ]  # fmt: skip
    assert report["vision"] is None and report["threshold"] is None
    # the same set read by the evaluation reader (`lare eval --benchmark refocus_shapes`)
    report = decontaminate(str(train), [f"refocus_shapes={against}"], str(output), rules=("text",), overwrite=True)
    assert report["against"][0]["benchmark"] == "refocus_shapes" and report["against"][0]["num_samples"] == 3
    assert [entry["text"] for entry in report["removed"]] == [{"against": f"refocus_shapes={against}", "id": "b0"}]


def test_lare_checkpoint_vision_tower_as_encoder(tiny_checkpoint):
    embedder = ImageEmbedder(tiny_checkpoint, "cpu")
    assert embedder.pooling == "lare vision_tower pooler_output"
    embeddings = embedder([scene(0), near_duplicate(scene(0))])
    assert embeddings.shape == (2, 32)
    assert float(embeddings[0] @ embeddings[1]) > 0.99


def test_invalid_arguments_name_the_fix(planted, tmp_path):
    train, against = planted
    with pytest.raises(ValueError, match="--vision DIR"):
        decontaminate(str(train), [str(against)], str(tmp_path / "o.jsonl"))
    with pytest.raises(ValueError, match="--threshold 1.5"):
        decontaminate(str(train), [str(against)], str(tmp_path / "o.jsonl"), vision="x", threshold=1.5)
    with pytest.raises(ValueError, match="is the --train file itself"):
        decontaminate(str(train), [str(against)], str(train), rules=("text",), overwrite=True)
    with pytest.raises(ValueError, match="not a benchmark"):
        decontaminate(str(train), [f"nosuch={against}"], str(tmp_path / "o.jsonl"), rules=("text",))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        decontaminate(str(train), [str(against)], str(tmp_path / "o.jsonl"), vision=str(tmp_path), threshold=0.9)


def test_cli_writes_prints_and_refuses_to_overwrite(planted, tiny_parts, tmp_path, capsys):
    train, against = planted
    output = tmp_path / "clean.jsonl"
    argv = ["data", "decontaminate", "--train", str(train), "--against", str(against), "--vision",
            str(tiny_parts[0] / "clip"), "--threshold", str(THRESHOLD), "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Removed 2 of 5 samples (text: 1, image: 1); kept 3" in printed
    assert "t-text (row 0): same question-answer as" in printed
    assert "t-image (row 1): image cosine 0.99" in printed
    assert f"Report: {report_path(output)}" in printed
    written = output.read_text()
    assert main(argv) == 2
    assert "exists; nothing was written" in capsys.readouterr().err
    assert output.read_text() == written
    assert main([*argv, "--overwrite"]) == 0
