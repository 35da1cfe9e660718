"""Does the alignment stage (captions, the Stage I analogue) teach the RefocusChains model to read the boards?

    python benchmarks/alignment_stage.py --seeds 1 --learning-rates 3e-3 1e-3 --lookup-fractions 0 0.4 --steps 1000

For every (seed, learning rate, lookup-caption share) it runs `lare_hf.reproduction.train_alignment` on 3,000
captions and prints the logged caption-loss curve, the first logged step at which the loss is below 0.5 (the
"break-through": on the ~0.97 plateau before it the model names the cells but not their marks) and the share of
correctly read marks when the aligned model lists 100 held-out (test-split) boards ("List the mark of every cell.",
greedy). One line of JSON per run; `--output DIR` keeps the data and trainer files (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lare_hf.data.refocus_chains import CAPTION_QUESTION, render_board, sample_board, write_refocus_chains
from lare_hf.reproduction import build_chains_model, train_alignment


@torch.no_grad()
def listing_mark_accuracy(state: dict, seed: int, num_boards: int = 100, batch_size: int = 50) -> tuple[float, int]:
    """% of (cell, mark) pairs whose mark is right when the aligned model lists held-out boards; pairs parsed."""
    model, processor = build_chains_model(seed=seed)
    model.load_state_dict(state)
    model.eval()
    rng = np.random.default_rng([seed, 9])
    boards = [sample_board(rng, "test") for _ in range(num_boards)]
    right = total = 0
    for start in range(0, num_boards, batch_size):
        chunk = boards[start : start + batch_size]
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_QUESTION}]}]
        text = processor.apply_chat_template(message, add_generation_prompt=True, num_latent_steps=0)
        inputs = processor(
            text=[text] * len(chunk), images=[render_board(c, m) for c, m in chunk], padding=True, return_tensors="pt"
        )
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False, num_latent_steps=0)
        for (_, marks), sequence in zip(chunk, output[:, inputs["input_ids"].shape[1] :]):
            listing = processor.decode(sequence, skip_special_tokens=True).removeprefix("cells:")
            for name, mark in re.findall(r"(\w+) (\w+)", listing)[:9]:
                total += 1
                right += marks.get(name) == mark
    return 100.0 * right / max(total, 1), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--lookup-fractions", type=float, nargs="+", default=[0.0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num-captions", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="keep data and trainer files here (default: temporary)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.output or scratch)
        for seed in args.seeds:
            for lookup in args.lookup_fractions:
                data = write_refocus_chains(
                    root / f"s{seed}_lookup{lookup}", 0, 0, seed=seed, num_captions=args.num_captions,
                    caption_lookup_fraction=lookup,
                )  # fmt: skip
                for learning_rate in args.learning_rates:
                    started = time.perf_counter()
                    state, summary = train_alignment(
                        data["captions"], root / f"s{seed}_lookup{lookup}_lr{learning_rate}", args.steps,
                        args.batch_size, learning_rate, seed,
                    )  # fmt: skip
                    seconds = time.perf_counter() - started
                    logged = [(e["step"], round(e["loss"], 3)) for e in summary["log_history"] if "loss" in e]
                    through = next((step for step, loss in logged if loss < 0.5), None)
                    accuracy, pairs = listing_mark_accuracy(state, seed)
                    print(json.dumps({
                        "seed": seed, "learning_rate": learning_rate, "lookup_fraction": lookup,
                        "steps": args.steps, "seconds": round(seconds), "loss_curve": logged,
                        "break_through_step": through, "held_out_mark_accuracy": round(accuracy, 1), "pairs": pairs,
                    }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
