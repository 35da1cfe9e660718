"""Repeated `generate` calls leave nothing behind: no hooks, no growing per-model caches or registries, no tensors
kept alive (the resident-memory figure over 1,000 calls is in benchmarks/bench_generate_memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from generate_load import generate_once, load_state  # noqa: E402  (benchmarks/ is not a package)


def test_200_generate_calls_accumulate_no_hooks_caches_or_tensors(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    for call in range(20):  # warm-up: lazily registered attention functions, first-call caches
        generate_once(model, processor, call)
    before = load_state(model)
    for call in range(20, 220):
        generate_once(model, processor, call)
    after = load_state(model)
    assert after.pop("live_tensors") <= before.pop("live_tensors") + 16  # a few loose references at most
    assert after == before
