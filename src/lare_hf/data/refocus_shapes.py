"""RefocusShapes: a procedurally generated benchmark whose questions need looking at small image regions.

A scene is a canvas (``image_size`` x ``image_size`` px, default 64 -- the lare-tiny preset's resolution) with
2-4 coloured containers (square / circle / triangle; red, green, blue, yellow, purple, orange) in distinct cells
of a 3x3 grid. Each container holds one small REAL handwritten digit from scikit-learn's bundled digits data set
(the 8x8 images of `sklearn.datasets.load_digits`, scaled up to ~60% of the container side -- 12 px at 64 px --
and ~50% in triangles). The digits in one scene are distinct, and so are the colour-shape combinations (a colour
may repeat with another shape).

Question types (the ``category`` field), roughly in rising difficulty:

``single``           "What digit is in the red square?"                                        -> "3"
``compare``          "Which digit is larger: the one in the red square or the one in the blue circle?" or
                     "What is the sum of the digits in the red square and the blue circle?"    -> "7" / "10"
``spatial``          "What digit is in the container to the left of the green circle?"          -> "5"
                     (left / right compare grid columns, above / below grid rows; the container asked
                     for is the only one on that side of the reference)
``exists``           "Is there a 7 in a blue container?"                                        -> "yes" / "no"
``multiple_choice``  "What digit is in the yellow triangle?\\nA. 3\\nB. 7\\nC. 1\\nD. 9"          -> "B"
``minimal_pair``     "Is the digit in the red square greater than 4?" asked of two scenes that differ only in
                     that container's digit, so the answer flips; both records share ``pair_id``.

Held-out test split (see `verify_held_out`):

* digit images: train uses sklearn digit samples ``0 .. DIGIT_SPLIT_INDEX-1`` (1437 images), test uses
  ``DIGIT_SPLIT_INDEX .. 1796`` (360 images) -- the same digit classes, other handwriting samples;
* colour-shape combinations in `RESERVED_COMBOS` ("yellow square", "orange circle", "purple triangle") never
  appear in train; every test scene contains at least one of them, and most test questions (about three in four)
  involve a reserved container. Every colour and every shape on its own is seen in training.

Records follow the reasoning format of `lare_hf.data.formats` (``image``, ``question``, ``rationale``,
``answer``, ``choices``) plus metadata: ``id``, ``category``, ``pair_id`` (-1 when not a minimal pair),
``digit_ids`` (sklearn indices drawn in the scene), ``combos`` ("colour shape" of every container), ``regions``
(pixel boxes ``[x0, y0, x1, y1]`` of the containers the question is about) and ``scene`` (JSON of all
containers). Generation is deterministic in ``seed``; train and test use independent random streams, so the
train split does not change with ``num_test`` (nor test with ``num_train``).

See docs/refocus_shapes.md.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (30, 150, 60),
    "blue": (35, 80, 215),
    "yellow": (225, 185, 0),
    "purple": (135, 55, 185),
    "orange": (240, 120, 10),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
ALL_COMBOS: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# Seen only at test time; each colour and each shape still occurs in training with other partners.
RESERVED_COMBOS: tuple[str, ...] = ("yellow square", "orange circle", "purple triangle")
TRAIN_COMBOS: tuple[str, ...] = tuple(c for c in ALL_COMBOS if c not in RESERVED_COMBOS)
CATEGORIES: tuple[str, ...] = ("single", "compare", "spatial", "exists", "multiple_choice", "minimal_pair")
NUM_DIGIT_SAMPLES = 1797
DIGIT_SPLIT_INDEX = 1437  # sklearn digit samples [0, 1437) -> train, [1437, 1797) -> test (80/20, every class in both)
GRID = 3
MIN_IMAGE_SIZE = 48
BACKGROUND = (246, 246, 246)
INK = (15, 15, 15)
_ROW_NAMES = ("top", "middle", "bottom")
_COL_NAMES = ("left", "center", "right")
_RELATIONS = {  # phrase -> (row/col attribute, sign): target.attr < ref.attr for "left of"/"above"
    "to the left of": ("col", -1),
    "to the right of": ("col", 1),
    "above": ("row", -1),
    "below": ("row", 1),
}


# ----------------------------------------------------------------------------------------------------------------
# digits


@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [1797, 8, 8] in 0..16, labels int64 [1797]) of scikit-learn's bundled digits.

    Reads the CSV shipped inside scikit-learn directly (the same data `sklearn.datasets.load_digits` returns)
    because importing `sklearn.datasets` costs seconds; falls back to `load_digits` if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:  # pragma: no cover - depends on the scikit-learn layout
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    if len(images) != NUM_DIGIT_SAMPLES:  # pragma: no cover
        raise RuntimeError(f"Expected {NUM_DIGIT_SAMPLES} sklearn digit samples, found {len(images)}.")
    return images, labels


def digit_pool(split: str) -> dict[int, np.ndarray]:
    """sklearn sample indices usable in `split` ("train" / "test"), by digit class."""
    _, labels = load_digit_images()
    if split == "train":
        indices = np.arange(0, DIGIT_SPLIT_INDEX)
    elif split == "test":
        indices = np.arange(DIGIT_SPLIT_INDEX, NUM_DIGIT_SAMPLES)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return {d: indices[labels[indices] == d] for d in range(10)}


@lru_cache(maxsize=64)
def _digit_mask(digit_id: int, size: int) -> Image.Image:
    images, _ = load_digit_images()
    pixels = np.clip(images[digit_id] * 16.0, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)


# ----------------------------------------------------------------------------------------------------------------
# scenes


@dataclass
class Container:
    colour: str
    shape: str
    digit: int
    digit_id: int
    row: int
    col: int
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def location(self) -> str:
        if self.row == 1 and self.col == 1:
            return "center"
        return f"{_ROW_NAMES[self.row]} {_COL_NAMES[self.col]}"


def _layout(rng: np.random.Generator, containers: list[Container], image_size: int) -> None:
    cell = image_size / GRID
    size = int(cell * 0.9)
    slack = int(cell) - size
    for c in containers:
        x0 = int(c.col * cell) + int(rng.integers(0, slack + 1))
        y0 = int(c.row * cell) + int(rng.integers(0, slack + 1))
        c.bbox = (x0, y0, x0 + size, y0 + size)


def _sample_scene(rng: np.random.Generator, split: str, image_size: int) -> list[Container]:
    n = int(rng.integers(2, 5))
    if split == "train":
        combos = [TRAIN_COMBOS[i] for i in rng.choice(len(TRAIN_COMBOS), n, replace=False)]
    else:
        first = RESERVED_COMBOS[int(rng.integers(len(RESERVED_COMBOS)))]
        others = [c for c in ALL_COMBOS if c != first]
        combos = [first] + [others[i] for i in rng.choice(len(others), n - 1, replace=False)]
        combos = [combos[i] for i in rng.permutation(n)]
    cells = rng.choice(GRID * GRID, n, replace=False)
    digits = rng.choice(10, n, replace=False)
    pool = digit_pool(split)
    containers = []
    for combo, cell, digit in zip(combos, cells, digits):
        colour, shape = combo.split(" ")
        digit_id = int(rng.choice(pool[int(digit)]))
        containers.append(Container(colour, shape, int(digit), digit_id, int(cell) // GRID, int(cell) % GRID))
    _layout(rng, containers, image_size)
    return containers


def render_scene(containers: list[Container], image_size: int) -> Image.Image:
    """Draw the containers and their digits on a fresh RGB canvas."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for c in containers:
        x0, y0, x1, y1 = c.bbox
        size = x1 - x0
        colour = COLOURS[c.colour]
        fill = tuple(int(0.3 * v + 0.7 * 255) for v in colour)
        width = max(1, size // 9)
        if c.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill, outline=colour, width=width)
        elif c.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill, outline=colour, width=width)
        else:
            draw.polygon(((x0 + size / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)), fill=fill, outline=colour, width=width)
        digit_size = max(6, round(size * (0.52 if c.shape == "triangle" else 0.62)))
        dx = x0 + (size - digit_size) // 2
        dy = y0 + (size - digit_size) // 2 if c.shape != "triangle" else y1 - digit_size - width
        image.paste(INK, (dx, dy, dx + digit_size, dy + digit_size), _digit_mask(c.digit_id, digit_size))
    return image


# ----------------------------------------------------------------------------------------------------------------
# questions


def _look(c: Container) -> str:
    return f"The {c.name} is at the {c.location}. It contains the digit {c.digit}."


def _pick_target(rng: np.random.Generator, containers: list[Container], split: str) -> Container:
    """The container a question is about: in test, a reserved combination half of the time."""
    reserved = [c for c in containers if c.name in RESERVED_COMBOS]
    if split == "test" and reserved and rng.random() < 0.5:
        return reserved[int(rng.integers(len(reserved)))]
    return containers[int(rng.integers(len(containers)))]


def _q_single(rng, containers, split) -> dict | None:
    t = _pick_target(rng, containers, split)
    return {
        "question": f"What digit is in the {t.name}?",
        "rationale": f"I need to look at the {t.name}. {_look(t)} So the answer is {t.digit}.",
        "answer": str(t.digit),
        "targets": [t],
    }


def _q_compare(rng, containers, split) -> dict | None:
    a = _pick_target(rng, containers, split)
    b = [c for c in containers if c is not a][int(rng.integers(len(containers) - 1))]
    if rng.random() < 0.5:
        a, b = b, a
    if rng.random() < 0.5:
        larger, smaller = (a, b) if a.digit > b.digit else (b, a)
        return {
            "question": f"Which digit is larger: the one in the {a.name} or the one in the {b.name}? "
            "Answer with the digit.",
            "rationale": f"{_look(a)} {_look(b)} {larger.digit} is larger than {smaller.digit}. "
            f"So the answer is {larger.digit}.",
            "answer": str(larger.digit),
            "targets": [a, b],
        }
    total = a.digit + b.digit
    return {
        "question": f"What is the sum of the digits in the {a.name} and the {b.name}?",
        "rationale": f"{_look(a)} {_look(b)} {a.digit} + {b.digit} = {total}. So the answer is {total}.",
        "answer": str(total),
        "targets": [a, b],
    }


def _q_spatial(rng, containers, split) -> dict | None:
    options = []
    for ref in containers:
        for phrase, (attr, sign) in _RELATIONS.items():
            hits = [c for c in containers if c is not ref and (getattr(c, attr) - getattr(ref, attr)) * sign > 0]
            if len(hits) == 1:
                options.append((ref, phrase, hits[0]))
    if not options:
        return None
    if split == "test":  # prefer questions that involve a reserved combination
        preferred = [o for o in options if o[0].name in RESERVED_COMBOS or o[2].name in RESERVED_COMBOS]
        if preferred and rng.random() < 0.5:
            options = preferred
    ref, phrase, target = options[int(rng.integers(len(options)))]
    return {
        "question": f"What digit is in the container {phrase} the {ref.name}?",
        "rationale": f"The {ref.name} is at the {ref.location}. The only container {phrase} it is the "
        f"{target.name} at the {target.location}. It contains the digit {target.digit}. "
        f"So the answer is {target.digit}.",
        "answer": str(target.digit),
        "targets": [ref, target],
    }


def _q_exists(rng, containers, split) -> dict | None:
    t = _pick_target(rng, containers, split)
    colour = t.colour
    same = [c for c in containers if c.colour == colour]
    present = {c.digit for c in same}
    if rng.random() < 0.5:
        digit, answer = t.digit, "yes"
    else:
        elsewhere = [c.digit for c in containers if c.colour != colour]  # hard negatives: digit in another colour
        pool = elsewhere if elsewhere and rng.random() < 0.5 else [d for d in range(10) if d not in present]
        digit, answer = int(pool[int(rng.integers(len(pool)))]), "no"
    if len(same) == 1:
        seen = f"There is one {colour} container: the {t.name} at the {t.location}. It contains the digit {t.digit}."
    else:
        parts = [f"the {c.name} at the {c.location} contains the digit {c.digit}" for c in same]
        seen = f"There are {len(same)} {colour} containers: " + ", and ".join(parts) + "."
    if answer == "yes":
        holder = next(c for c in same if c.digit == digit)
        verdict = f"The {holder.name} contains a {digit}. So the answer is yes."
    else:
        verdict = f"No {colour} container contains a {digit}. So the answer is no."
    return {
        "question": f"Is there a {digit} in a {colour} container?",
        "rationale": f"{seen} {verdict}",
        "answer": answer,
        "targets": same,
    }


def _q_multiple_choice(rng, containers, split) -> dict | None:
    t = _pick_target(rng, containers, split)
    distractors = [c.digit for c in containers if c is not t]  # digits elsewhere in the scene come first
    rest = [d for d in rng.permutation(10).tolist() if d != t.digit and d not in distractors]
    options = [t.digit] + (distractors + rest)[:3]
    options = [options[i] for i in rng.permutation(4)]
    letters = "ABCD"
    letter = letters[options.index(t.digit)]
    listing = "\n".join(f"{L}. {d}" for L, d in zip(letters, options))
    return {
        "question": f"What digit is in the {t.name}?\n{listing}",
        "rationale": f"I need to look at the {t.name}. {_look(t)} Option {letter} is {t.digit}. "
        f"So the answer is {letter}.",
        "answer": letter,
        "choices": [str(d) for d in options],
        "targets": [t],
    }


_BUILDERS = {
    "single": _q_single,
    "compare": _q_compare,
    "spatial": _q_spatial,
    "exists": _q_exists,
    "multiple_choice": _q_multiple_choice,
}


def _minimal_pair(rng, containers, split) -> tuple[list[Container], list[Container], dict, dict] | None:
    t = _pick_target(rng, containers, split)
    others = {c.digit for c in containers if c is not t}
    for _ in range(20):
        k = int(rng.integers(0, 9))
        high = [d for d in range(k + 1, 10) if d not in others]
        low = [d for d in range(0, k + 1) if d not in others]
        if high and low:
            break
    else:  # pragma: no cover - practically unreachable with at most 3 other digits
        return None
    hi, lo = int(high[int(rng.integers(len(high)))]), int(low[int(rng.integers(len(low)))])
    pool = digit_pool(split)
    scenes, records = [], []
    for digit, answer in ((hi, "yes"), (lo, "no")):
        scene = [Container(**{**c.__dict__}) for c in containers]
        idx = containers.index(t)
        changed = scene[idx]
        if changed.digit != digit:
            changed.digit, changed.digit_id = digit, int(rng.choice(pool[digit]))
        relation = "is greater than" if answer == "yes" else "is not greater than"
        scenes.append(scene)
        records.append(
            {
                "question": f"Is the digit in the {t.name} greater than {k}?",
                "rationale": f"I need to look at the {t.name}. {_look(changed)} {digit} {relation} {k}. "
                f"So the answer is {answer}.",
                "answer": answer,
                "targets": [changed],
            }
        )
    if rng.random() < 0.5:
        scenes.reverse()
        records.reverse()
    return scenes[0], scenes[1], records[0], records[1]


def _record(
    scene: list[Container], item: dict, category: str, pair_id: int, index: int, split: str, image_size: int
) -> dict:
    return {
        "id": f"{split}-{index:06d}",
        "image": render_scene(scene, image_size),
        "question": item["question"],
        "rationale": item["rationale"],
        "answer": item["answer"],
        "choices": item.get("choices", []),
        "category": category,
        "pair_id": pair_id,
        "digit_ids": [c.digit_id for c in scene],
        "combos": [c.name for c in scene],
        "regions": [list(c.bbox) for c in item["targets"]],
        "scene": json.dumps(
            [
                {"colour": c.colour, "shape": c.shape, "digit": c.digit, "digit_id": c.digit_id, "bbox": list(c.bbox)}
                for c in scene
            ]
        ),
    }


def generate_split(split: str, num: int, seed: int = 0, image_size: int = 64) -> list[dict]:
    """`num` records of `split` ("train" / "test") as plain dicts with PIL images (deterministic in `seed`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if num < 0:
        raise ValueError(f"the number of records must be >= 0, got {num}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} px (digits get unreadable), got {image_size}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    records: list[dict] = []
    pair_id, turn = 0, 0
    while len(records) < num:
        category = CATEGORIES[turn % len(CATEGORIES)]
        turn += 1
        if category == "minimal_pair" and num - len(records) < 2:
            continue
        while True:
            scene = _sample_scene(rng, split, image_size)
            if category == "minimal_pair":
                pair = _minimal_pair(rng, scene, split)
                if pair is not None:
                    break
            else:
                item = _BUILDERS[category](rng, scene, split)
                if item is not None:
                    break
        if category == "minimal_pair":
            scene_a, scene_b, item_a, item_b = pair
            records.append(_record(scene_a, item_a, category, pair_id, len(records), split, image_size))
            records.append(_record(scene_b, item_b, category, pair_id, len(records), split, image_size))
            pair_id += 1
        else:
            records.append(_record(scene, item, category, -1, len(records), split, image_size))
    return records


FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "rationale": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "category": datasets.Value("string"),
        "pair_id": datasets.Value("int64"),
        "digit_ids": datasets.List(datasets.Value("int64")),
        "combos": datasets.List(datasets.Value("string")),
        "regions": datasets.List(datasets.List(datasets.Value("int64"))),
        "scene": datasets.Value("string"),
    }
)


def _to_dataset(records: list[dict]) -> datasets.Dataset:
    columns = {name: [r[name] for r in records] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def generate_refocus_shapes(
    num_train: int, num_test: int, seed: int = 0, image_size: int = 64
) -> datasets.DatasetDict:
    """The RefocusShapes benchmark as a `DatasetDict` with "train" and "test" splits (see the module docstring)."""
    return datasets.DatasetDict(
        {
            "train": _to_dataset(generate_split("train", num_train, seed, image_size)),
            "test": _to_dataset(generate_split("test", num_test, seed, image_size)),
        }
    )


def write_refocus_shapes(
    output_dir: str | os.PathLike, num_train: int, num_test: int, seed: int = 0, image_size: int = 64
) -> dict[str, str]:
    """Write ``output_dir/{train,test}.jsonl`` and PNGs in ``output_dir/images/``; returns split -> JSONL path.

    Each JSONL line is one record with ``"image": "images/<id>.png"`` (relative to `output_dir`), so the files
    load with ``datasets.load_dataset("json", data_files=...)``, `lare_hf.data.formats.load_records` and the
    "refocus_shapes" evaluation benchmark.
    """
    root = Path(output_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, num in (("train", num_train), ("test", num_test)):
        path = root / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for record in generate_split(split, num, seed, image_size):
                relative = f"images/{record['id']}.png"
                record["image"].save(root / relative, format="PNG")
                handle.write(json.dumps({**record, "image": relative}) + "\n")
        paths[split] = str(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# held-out checks


def _rows(split: Any) -> Iterable[Mapping]:
    if isinstance(split, datasets.Dataset):
        return split.select_columns([c for c in ("id", "digit_ids", "combos") if c in split.column_names])
    return split


def verify_held_out(splits: Mapping[str, Any]) -> dict[str, Any]:
    """Check the held-out rules on generated data; raises ValueError naming the first violation.

    `splits` maps "train" / "test" to a `datasets.Dataset` or an iterable of records (dicts with ``digit_ids`` and
    ``combos``), e.g. a `generate_refocus_shapes` result or the rows of the written JSONL files. Rules: train
    digit ids < `DIGIT_SPLIT_INDEX` <= test digit ids (so the sets are disjoint); no train scene contains a
    `RESERVED_COMBOS` combination; every test scene contains at least one. Returns a summary.
    """
    seen: dict[str, set[int]] = {}
    combos_seen: dict[str, set[str]] = {}
    for split in ("train", "test"):
        if split not in splits:
            raise ValueError(f"verify_held_out needs a {split!r} split, got {sorted(splits)}")
        ids, combos = set(), set()
        for row in _rows(splits[split]):
            rid = row.get("id", "?")
            digit_ids = list(row["digit_ids"])
            scene_combos = list(row["combos"])
            if split == "train":
                bad = [i for i in digit_ids if not 0 <= i < DIGIT_SPLIT_INDEX]
                reserved = sorted(set(scene_combos) & set(RESERVED_COMBOS))
                if reserved:
                    raise ValueError(f"train record {rid} uses reserved combination(s) {reserved}")
            else:
                bad = [i for i in digit_ids if not DIGIT_SPLIT_INDEX <= i < NUM_DIGIT_SAMPLES]
                if not set(scene_combos) & set(RESERVED_COMBOS):
                    raise ValueError(f"test record {rid} has no reserved combination (combos {scene_combos})")
            if bad:
                raise ValueError(f"{split} record {rid} uses digit samples {bad} from outside the {split} pool")
            ids.update(digit_ids)
            combos.update(scene_combos)
        seen[split], combos_seen[split] = ids, combos
    overlap = seen["train"] & seen["test"]
    if overlap:  # implied by the ranges above; kept as an explicit check
        raise ValueError(f"digit samples shared by train and test: {sorted(overlap)[:10]}")
    return {
        "train_digit_ids": len(seen["train"]),
        "test_digit_ids": len(seen["test"]),
        "reserved_combos": list(RESERVED_COMBOS),
        "test_combos_unseen_in_train": sorted(combos_seen["test"] - combos_seen["train"]),
    }


__all__ = [
    "ALL_COMBOS",
    "CATEGORIES",
    "COLOURS",
    "DIGIT_SPLIT_INDEX",
    "FEATURES",
    "RESERVED_COMBOS",
    "SHAPES",
    "TRAIN_COMBOS",
    "digit_pool",
    "generate_refocus_shapes",
    "generate_split",
    "load_digit_images",
    "render_scene",
    "verify_held_out",
    "write_refocus_shapes",
]
