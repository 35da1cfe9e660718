"""Memory under load (issue 27, item 6): resident memory over 1,000 consecutive `generate` calls on the tiny model
with varied inputs (batch 1-3, with and without images, K 0-4, image sizes, adaptive halting, greedy and sampled;
benchmarks/generate_load.py). Prints the RSS after warm-up and at the end, the growth in percent (goal < 5%), and
whether hooks, per-model caches, attention registries or live tensors grew.

    PYTHONPATH=src python benchmarks/bench_generate_memory.py [--calls 1000] [--warmup 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_load import generate_once, load_state  # noqa: E402

from lare_hf.build import build_tiny  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor = build_tiny()
    model.eval()
    for call in range(args.warmup):
        generate_once(model, processor, call)
    state_before, rss_before = load_state(model), rss_mib()
    start, samples = time.perf_counter(), []
    for call in range(args.warmup, args.warmup + args.calls):
        generate_once(model, processor, call)
        if (call - args.warmup + 1) % max(args.calls // 10, 1) == 0:
            samples.append(round(rss_mib(), 1))
    state_after, rss_after = load_state(model), rss_mib()
    growth = {
        key: state_after[key] - state_before[key] for key in state_before if state_after[key] != state_before[key]
    }
    print(
        json.dumps(
            {
                "calls": args.calls,
                "warmup_calls": args.warmup,
                "seconds": round(time.perf_counter() - start, 1),
                "rss_after_warmup_mib": round(rss_before, 1),
                "rss_end_mib": round(rss_after, 1),
                "rss_every_tenth_mib": samples,
                "rss_growth_percent": round(100 * (rss_after - rss_before) / rss_before, 2),
                "state_growth": growth,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
