"""RefocusChains: a synthetic benchmark whose every reasoning step needs a different image region.

A board is a 3x3 grid of square cells, ``CELL_SIZE`` px each (24 px images by default, so a vision tower with
8-px patches sees exactly one cell per patch). Every cell is filled with its own *name* colour and carries, as a
centre square of half its side, a *mark* in another colour; the nine name colours are distinct and the marks form
one cycle through all nine (a cell's mark names the next cell of the cycle, never itself). With the ``"fixed"``
layout (default) a colour always sits in the same cell and only the marks change; ``"random"`` also shuffles the
cells.

Question: ``From the red cell, follow 3 marks.`` -- read the red cell's mark (say green), go to the green cell,
read its mark, and so on; after h hops the answer is ``the blue cell``. The rationale names the path,
``path: red green pink blue``, and the record's ``visited_cells`` lists, for reasoning step k = 1..h, the [row, col]
of the cell whose mark that step reads: step k needs exactly that one cell, which is what a refocusing window
should cover (`window_hits`). ``category`` is the number of hops (as a string), so reports split accuracy by
chain length.

Alignment captions (`generate_captions`, the Stage I analogue): "List the mark of every cell." -> ``cells: pink
cyan, brown blue, ...`` -- every cell's colour and its mark, in a random order, on train boards only.

Held-out test split: a board (name layout + marks) belongs to test when the CRC-32 of its description is 0 mod 5,
to train otherwise (`board_split`), so no test board, and hence no test image, occurs in training
(`verify_held_out`). Of the 8! = 40,320 possible mark cycles per layout about a fifth are test boards. Generation is
deterministic in ``seed``; train and test use independent random streams.

See docs/refocus_chains.md.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 0),
    "purple": (130, 40, 170),
    "orange": (245, 130, 0),
    "pink": (255, 140, 200),
    "cyan": (0, 215, 225),
    "brown": (120, 70, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
GRID = 3
CELL_SIZE = 8
LAYOUTS = ("fixed", "random")
STARTS = ("top_left", "random")
MAX_HOPS = 8  # a 9-cycle revisits its start after 9 hops
HELD_OUT_MODULUS = 5
QUESTION_TEMPLATE = "From the {start} cell, follow {hops} {marks}."
CAPTION_QUESTION = "List the mark of every cell."
UNIFORM_CAPTION_QUESTION = "What colour are the cells and their marks?"
LOOKUP_CAPTION_QUESTION = "What is the mark of the {colour} cell?"
# share of one-cell lookups among the alignment captions that `write_refocus_chains` writes (see docs/refocus_chains.md)
CAPTION_LOOKUP_FRACTION = 0.0


def board_key(cells: Sequence[str], marks: Mapping[str, str]) -> str:
    """Canonical description of a board: the name colours row by row, then each cell's mark in the same order."""
    return ",".join(cells) + "|" + ",".join(marks[c] for c in cells)


def board_split(cells: Sequence[str], marks: Mapping[str, str]) -> str:
    """ "test" when the board's CRC-32 is 0 mod `HELD_OUT_MODULUS`, else "train"."""
    return "test" if zlib.crc32(board_key(cells, marks).encode()) % HELD_OUT_MODULUS == 0 else "train"


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


def sample_board(rng: np.random.Generator, split: str, layout: str = "fixed") -> tuple[list[str], dict[str, str]]:
    """(cells, marks) of a random board of `split`: cells are the name colours row by row, marks maps a cell's
    colour to its mark colour (one 9-cycle)."""
    _check_split(split)
    _check_layout(layout)
    while True:
        if layout == "fixed":
            cells = list(COLOUR_NAMES)
        else:
            cells = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))]
        order = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))]
        marks = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
        if board_split(cells, marks) == split:
            return cells, marks


def render_board(cells: Sequence[str], marks: Mapping[str, str], cell_size: int = CELL_SIZE) -> Image.Image:
    """RGB image of a board: each cell filled with its colour, its mark a centre square of half the cell side."""
    if cell_size < 2 or cell_size % 2:
        raise ValueError(f"cell_size must be an even number of pixels >= 2, got {cell_size}.")
    size = GRID * cell_size
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    quarter = cell_size // 4 if cell_size >= 4 else 0
    for index, colour in enumerate(cells):
        row, col = divmod(index, GRID)
        y0, x0 = row * cell_size, col * cell_size
        pixels[y0 : y0 + cell_size, x0 : x0 + cell_size] = COLOURS[colour]
        inner = slice(y0 + quarter, y0 + cell_size - quarter), slice(x0 + quarter, x0 + cell_size - quarter)
        pixels[inner] = COLOURS[marks[colour]]
    return Image.fromarray(pixels, mode="RGB")


def follow(marks: Mapping[str, str], start: str, hops: int) -> list[str]:
    """The path start, mark(start), mark(mark(start)), ... of `hops` hops (hops + 1 colours)."""
    path = [start]
    for _ in range(hops):
        path.append(marks[path[-1]])
    return path


def _check_hops(hops: Sequence[int]) -> tuple[int, ...]:
    hops = tuple(int(h) for h in hops)
    if not hops or any(not 1 <= h <= MAX_HOPS for h in hops):
        raise ValueError(f"hops must be a non-empty list of chain lengths in 1..{MAX_HOPS}, got {list(hops)}.")
    return hops


def _board_json(cells: Sequence[str], marks: Mapping[str, str]) -> str:
    return json.dumps({"cells": list(cells), "marks": [marks[c] for c in cells]})


def generate_split(
    split: str,
    num: int,
    seed: int = 0,
    hops: Sequence[int] = (1, 2, 3, 4),
    layout: str = "fixed",
    cell_size: int = CELL_SIZE,
    start: str = "top_left",
) -> list[dict[str, Any]]:
    """`num` question records of `split` with PIL images; chain lengths cycle through `hops` (deterministic).
    `start`: "top_left" (default) starts every chain at the top-left cell (so a one-hop question is a read at a
    fixed place and each further hop one content lookup), "random" at a random cell (one lookup more per question).
    """
    _check_split(split)
    _check_layout(layout)
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}.")
    start_mode = start
    hops = _check_hops(hops)
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}.")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    records = []
    for index in range(num):
        h = hops[index % len(hops)]
        cells, marks = sample_board(rng, split, layout)
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]  # drawn in both modes: same boards either way
        start = cells[0] if start_mode == "top_left" else colour
        path = follow(marks, start, h)
        records.append(
            {
                "id": f"{split}-{index:06d}",
                "image": render_board(cells, marks, cell_size),
                "question": QUESTION_TEMPLATE.format(start=start, hops=h, marks="mark" if h == 1 else "marks"),
                "rationale": "path: " + " ".join(path),
                "answer": f"the {path[-1]} cell",
                "category": str(h),
                "hops": h,
                "visited_cells": [list(divmod(cells.index(colour), GRID)) for colour in path[:-1]],
                "board": _board_json(cells, marks),
            }
        )
    return records


def generate_captions(
    num: int,
    seed: int = 0,
    layout: str = "fixed",
    cell_size: int = CELL_SIZE,
    uniform_fraction: float = 0.5,
    lookup_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """`num` alignment records (the Stage I analogue), on train boards only, of three kinds:

    - a `uniform_fraction` shows nine identical cells ("What colour are the cells and their marks?" ->
      "cells: red, marks: green"): naming colours there needs no selective attention, so the model learns to read
      a cell's colour and its mark first;
    - a `lookup_fraction` asks for one cell's mark ("What is the mark of the pink cell?" -> "cyan"), a grounding
      question like the paper's Stage I region data: one lookup with its own answer;
    - the others list every cell of a real board with its mark in a random order ("List the mark of every cell."
      -> "cells: pink cyan, brown blue, ..."): one lookup per pair.
    """
    _check_layout(layout)
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}.")
    for name, value in (("uniform_fraction", uniform_fraction), ("lookup_fraction", lookup_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")
    if uniform_fraction + lookup_fraction > 1.0:
        raise ValueError(
            f"uniform_fraction + lookup_fraction must be <= 1, got {uniform_fraction} + {lookup_fraction}; the rest "
            "are board listings."
        )
    rng = np.random.default_rng([seed, 2])
    records = []
    for index in range(num):
        kind = rng.random()
        if kind < uniform_fraction:
            colour, mark = (COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), 2, replace=False))
            cells, marks = [colour] * len(COLOUR_NAMES), {colour: mark}
            question, answer = UNIFORM_CAPTION_QUESTION, f"cells: {colour}, marks: {mark}"
        elif kind < uniform_fraction + lookup_fraction:
            cells, marks = sample_board(rng, "train", layout)
            colour = cells[int(rng.integers(len(cells)))]
            question, answer = LOOKUP_CAPTION_QUESTION.format(colour=colour), marks[colour]
        else:
            cells, marks = sample_board(rng, "train", layout)
            order = [cells[i] for i in rng.permutation(len(cells))]
            question, answer = CAPTION_QUESTION, "cells: " + ", ".join(f"{c} {marks[c]}" for c in order)
        records.append(
            {
                "id": f"caption-{index:06d}",
                "image": render_board(cells, marks, cell_size),
                "question": question,
                "answer": answer,
                "board": json.dumps({"cells": list(cells), "marks": [marks[c] for c in cells]}),
            }
        )
    return records


def chain_path(example: Mapping[str, Any]) -> list[str]:
    """The colours a chain visits, start first, read from an example's rationale ``path: red green blue``."""
    rationale = str(example.get("rationale") or "")
    if not rationale.startswith("path:"):
        raise ValueError(
            f"Example {example.get('id', '?')!r} has no RefocusChains rationale ('path: ...'): {rationale!r}"
        )
    return rationale.removeprefix("path:").split()


def chain_step_targets(example: Mapping[str, Any]) -> list[str]:
    """The colour each hop reaches (path[1:]), read from an example's rationale ``path: red green blue``: what
    latent step k resolves, for `LaReDataCollator(latent_step_targets=...)`."""
    return chain_path(example)[1:]


def chain_rationale_after(replaced_hops: int) -> Callable[[Mapping[str, Any]], str]:
    """The rationale with its first `replaced_hops` hops left to latent steps (Coconut's curriculum stage c): a
    function of the example giving ``path: `` and the colours from the one hop `replaced_hops` reaches on (the last
    colour once every hop is replaced), for `LaReDataCollator(response_rationale=...)`."""
    if isinstance(replaced_hops, bool) or not isinstance(replaced_hops, int) or replaced_hops < 0:
        raise ValueError(f"replaced_hops must be an integer >= 0, got {replaced_hops!r}.")

    def rationale(example: Mapping[str, Any]) -> str:
        path = chain_path(example)
        return "path: " + " ".join(path[min(replaced_hops, len(path) - 1) :])

    return rationale


def chain_window_targets(example: Mapping[str, Any]) -> list[int]:
    """The image token each hop reads (row-major, one patch per cell), for `LaReDataCollator(window_targets=...)`:
    the cells of path[:-1] (the records' ``visited_cells``), read from the rationale ``path: red green blue``.
    Boards of the ``"fixed"`` layout only, where a colour's cell is its index in `COLOUR_NAMES` (the loaded
    examples keep no board); the RefocusChains reproduction uses that layout."""
    return [COLOUR_NAMES.index(colour) for colour in chain_path(example)[:-1]]


def _write_jsonl(root: Path, name: str, records: Iterable[dict[str, Any]]) -> str:
    path = root / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            relative = f"images/{record['id']}.png"
            record["image"].save(root / relative, format="PNG")
            handle.write(json.dumps({**record, "image": relative}) + "\n")
    return str(path)


def write_refocus_chains(
    output_dir: str | os.PathLike,
    num_train: int,
    num_test: int,
    seed: int = 0,
    hops: Sequence[int] = (1, 2, 3, 4),
    layout: str = "fixed",
    num_captions: int = 0,
    cell_size: int = CELL_SIZE,
    start: str = "top_left",
    caption_lookup_fraction: float = CAPTION_LOOKUP_FRACTION,
) -> dict[str, str]:
    """Write ``output_dir/{train,test}.jsonl`` (and ``captions.jsonl`` when `num_captions` > 0) with PNGs in
    ``output_dir/images/``; returns split -> JSONL path. A `caption_lookup_fraction` of the captions are one-cell
    lookups, the rest split evenly between uniform boards and board listings (`generate_captions`). Images are
    referenced relative to `output_dir`, so the files load with `lare_hf.data.formats.load_records`,
    ``datasets.load_dataset("json", ...)`` and the "refocus_chains" evaluation benchmark."""
    root = Path(output_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = {
        "train": _write_jsonl(root, "train", generate_split("train", num_train, seed, hops, layout, cell_size, start)),
        "test": _write_jsonl(root, "test", generate_split("test", num_test, seed, hops, layout, cell_size, start)),
    }
    if num_captions:
        uniform = (1.0 - caption_lookup_fraction) / 2
        captions = generate_captions(num_captions, seed, layout, cell_size, uniform, caption_lookup_fraction)
        paths["captions"] = _write_jsonl(root, "captions", captions)
    return paths


def _parse_board(row: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    board = row["board"] if isinstance(row["board"], dict) else json.loads(row["board"])
    cells = list(board["cells"])
    return cells, dict(zip(cells, board["marks"]))


def verify_held_out(splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, Any]:
    """Check that every train (and captions) board is a train board and every test board a test board, so no board
    is shared; raises ValueError naming the first violation. `splits` maps split names ("train", "test",
    optionally "captions") to records with a ``board`` field. Returns the number of distinct boards per split."""
    boards: dict[str, set[str]] = {}
    for name, rows in splits.items():
        expected = "test" if name == "test" else "train"
        seen = set()
        for row in rows:
            cells, marks = _parse_board(row)
            if len(set(cells)) < len(cells):  # a uniform caption board: not a permutation, never a question board
                continue
            if board_split(cells, marks) != expected:
                raise ValueError(f"{name} record {row.get('id', '?')} has a {board_split(cells, marks)} board.")
            seen.add(board_key(cells, marks))
        boards[name] = seen
    if "train" not in boards or "test" not in boards:
        raise ValueError(f"verify_held_out needs 'train' and 'test' splits, got {sorted(splits)}.")
    shared = boards["test"] & set().union(*(b for n, b in boards.items() if n != "test"))
    if shared:  # implied by the split rule; kept as an explicit check
        raise ValueError(f"boards shared by test and training data: {sorted(shared)[:3]}")
    return {f"{name}_boards": len(b) for name, b in boards.items()}


def window_hits(
    windows: Sequence[Sequence[int]], visited_cells: Sequence[Sequence[int]], window_size: int
) -> list[bool]:
    """For reasoning steps k = 1..len(visited_cells): does latent step k's window ([row, col] of its top-left
    patch, `window_size` patches wide) cover the cell step k reads? Steps without a window count as misses."""
    hits = []
    for k, (row, col) in enumerate(visited_cells):
        if k >= len(windows):
            hits.append(False)
            continue
        top, left = int(windows[k][0]), int(windows[k][1])
        hits.append(top <= row < top + window_size and left <= col < left + window_size)
    return hits


def window_hit_rates_by_step(
    windows: Sequence[Sequence[Sequence[int]]], visited_cells: Sequence[Sequence[Sequence[int]]], window_size: int
) -> dict[str, Any]:
    """`window_hits` over samples (per sample: its windows `[K, 2]` and the cells its reasoning steps read), in
    percent: ``window_hit_rate`` over every reasoning step (None without any), ``window_hit_rate_by_step`` {k: rate}
    and ``num_samples_by_step`` {k: reasoning steps k counted}."""
    by_step: dict[int, list[bool]] = {}
    for sample_windows, cells in zip(windows, visited_cells):
        for k, hit in enumerate(window_hits(sample_windows, cells, window_size)):
            by_step.setdefault(k + 1, []).append(hit)
    hits = [hit for values in by_step.values() for hit in values]
    return {
        "window_hit_rate": 100.0 * (sum(hits) / len(hits)) if hits else None,
        "window_hit_rate_by_step": {k: 100.0 * (sum(v) / len(v)) for k, v in sorted(by_step.items())},
        "num_samples_by_step": {k: len(v) for k, v in sorted(by_step.items())},
    }


__all__ = [
    "CAPTION_QUESTION",
    "UNIFORM_CAPTION_QUESTION",
    "CELL_SIZE",
    "COLOURS",
    "COLOUR_NAMES",
    "GRID",
    "LAYOUTS",
    "MAX_HOPS",
    "QUESTION_TEMPLATE",
    "board_split",
    "chain_path",
    "chain_step_targets",
    "chain_window_targets",
    "follow",
    "generate_captions",
    "generate_split",
    "render_board",
    "sample_board",
    "verify_held_out",
    "window_hit_rates_by_step",
    "window_hits",
    "write_refocus_chains",
]
