"""Small files in the public layouts of the evaluation benchmarks, shared by the benchmark and `lare eval` tests."""

from __future__ import annotations

import io

import datasets
import pandas as pd
from PIL import Image


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image_dataset(columns: dict, images: list) -> datasets.Dataset:
    return datasets.Dataset.from_dict({**columns, "image": images}).cast_column("image", datasets.Image())


def write_mmbench(path):
    rows = [  # question 1 with two circular shifts, question 2 (two options) with one, question 3 alone
        (1, "Q1?", None, "cat", "dog", "cow", "pig", "A", "animals"),
        (1000001, "Q1?", None, "dog", "cow", "pig", "cat", "D", "animals"),
        (2000001, "Q1?", None, "cow", "pig", "cat", "dog", "C", "animals"),
        (2, "Q2?", "nan", "red", "blue", None, float("nan"), "B", "animals"),
        (1000002, "Q2?", "nan", "blue", "red", None, float("nan"), "A", "animals"),
        (3, "Q3?", "A hint.", "one", "two", "three", "four", "C", "counting"),
    ]
    frame = pd.DataFrame(rows, columns=["index", "question", "hint", "A", "B", "C", "D", "answer", "category"])
    frame["L2-category"] = ["perception"] * 5 + ["reasoning"]
    frame["source"] = "test"
    frame["split"] = "dev"
    frame["image"] = [{"bytes": png((i * 40, 0, 0)), "path": None} for i in range(len(rows))]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)


def write_pope(path):
    ds = image_dataset(
        {
            "id": [str(i) for i in range(6)],
            "question_id": [str(i % 3 + 1) for i in range(6)],
            "question": ["Is there a dog in the image?"] * 6,
            "answer": ["yes", "yes", "no", "no", "yes", "no"],
            "image_source": [f"COCO_val2014_{i:012d}" for i in range(6)],
            "category": ["adversarial"] * 3 + ["random"] * 3,
        },
        [png((i, i, i)) for i in range(6)],
    )
    ds.to_parquet(str(path))
