"""Small-scale reproduction of the paper's Tables 1 and 3 on RefocusShapes, on CPU (issue: evaluation, item 4).

Trains, with the same budget (steps x batch size, optimiser, seed) and from the same random-init lare-tiny
weights, then evaluates on the held-out split:
  (a) no-latent baseline (K=0, answer only),
  (b) explicit chain-of-thought baseline (K=0, the model writes the rationale, then "Answer: ..."),
  (c) LaRe, K=4, all losses (Eq. 10),
  (d) LaRe without the Extractor / without the sliding window / without L_sym / without L_img / without L_text.

    python benchmarks/reproduce_refocus_shapes.py --output outputs/reproduction [--steps 600] [--batch-size 8]

Deviation from the paper, forced by the offline 2-core setting: there are no pretrained parts here, so every
variant trains the whole tiny model (vision tower included) from random init in one stage, instead of the four
stages on top of CLIP + Qwen2.5. Prints a Markdown table (accuracy %, mean generated tokens on correct answers)
and writes it with all reports to --output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import set_seed

from lare_hf.build import build_tiny, save_checkpoint
from lare_hf.data.collator import LaReDataCollator
from lare_hf.data.formats import load_records
from lare_hf.data.refocus_shapes import write_refocus_shapes
from lare_hf.evaluation.runner import evaluate
from lare_hf.training.arguments import LaReTrainingArguments
from lare_hf.training.trainer import LaReTrainer

VARIANTS = {
    "No-latent baseline (K=0)": dict(steps=0, latent_losses=False),
    "Explicit CoT baseline (K=0)": dict(steps=0, latent_losses=False, cot=True),
    "LaRe (K=4, all losses)": dict(steps=4, latent_losses=True),
    "w/o Extractor": dict(steps=4, latent_losses=True, overrides={"use_extractor": False}),
    "w/o Sliding Window": dict(steps=4, latent_losses=True, overrides={"use_sliding_window": False}),
    "w/o Symmetric Alignment": dict(steps=4, latent_losses=True, overrides={"sym_loss_weight": 0.0}),
    "w/o Image Reconstruction": dict(steps=4, latent_losses=True, overrides={"image_loss_weight": 0.0}),
    "w/o Text Prefix Reconstruction": dict(steps=4, latent_losses=True, overrides={"text_loss_weight": 0.0}),
}


class FromScratchTrainer(LaReTrainer):
    """Every module but the frozen image tokenizer trains (no pretrained parts exist offline)."""

    stage = 0
    trainable_groups = ("vision", "projector", "latent", "language_model")


def train_variant(name: str, spec: dict, data: str, output: Path, args) -> Path:
    set_seed(args.seed)
    model, processor = build_tiny(overrides=spec.get("overrides"), seed=args.seed)
    FromScratchTrainer.latent_losses = spec["latent_losses"]
    FromScratchTrainer.configure_model(model)
    records = load_records(data)
    collator = LaReDataCollator(
        processor=processor,
        num_latent_steps=spec["steps"],
        with_rationale=spec["latent_losses"],
        max_rationale_length=64,
        rationale_in_answer=spec.get("cot", False),
    )
    training_args = LaReTrainingArguments(
        output_dir=str(output / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=0.05,
        warmup_steps=0.03,
        lr_scheduler_type="cosine",
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = FromScratchTrainer(
        model=model, args=training_args, train_dataset=records, data_collator=collator, processing_class=processor
    )
    started = time.perf_counter()
    trainer.train()
    print(f"[{name}] trained {args.steps} steps in {time.perf_counter() - started:.0f}s", flush=True)
    model_dir = output / "model"
    processor.num_latent_steps = spec["steps"]
    save_checkpoint(trainer.model, processor, str(model_dir))
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/reproduction")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    root = Path(args.output)
    paths = write_refocus_shapes(str(root / "data"), args.num_train, args.num_test, seed=args.seed, image_size=64)
    rows = []
    for index, name in enumerate(args.variants):
        spec = VARIANTS[name]
        output = root / f"variant{index}"
        model_dir = train_variant(name, spec, paths["train"], output, args)
        report = evaluate(
            str(model_dir), "refocus_shapes", paths["test"], num_latent_steps=spec["steps"], batch_size=16,
            max_new_tokens=96 if spec.get("cot") else 16, output_dir=str(output), progress=False,
        )  # fmt: skip
        rows.append((name, report))
        print(
            f"[{name}] accuracy {report['accuracy']:.1f}%  tokens(correct) {report['avg_tokens_correct']}", flush=True
        )

    lines = [
        f"RefocusShapes held-out split ({args.num_test} questions), lare-tiny from scratch, {args.steps} steps x "
        f"batch {args.batch_size}, lr {args.learning_rate}, seed {args.seed}.",
        "",
        "| method | accuracy (%) | # tokens (correct) | pair acc. (%) | " + " | ".join(
            sorted(rows[0][1]["per_category"])) + " |",
        "|---|---|---|---|" + "---|" * len(rows[0][1]["per_category"]),
    ]  # fmt: skip
    for name, report in rows:
        tokens = report["avg_tokens_correct"]
        per_category = " | ".join(f"{report['per_category'][k]:.1f}" for k in sorted(report["per_category"]))
        lines.append(
            f"| {name} | {report['accuracy']:.1f} | {'-' if tokens is None else f'{tokens:.1f}'} | "
            f"{report.get('pair_accuracy', float('nan')):.1f} | {per_category} |"
        )
    table = "\n".join(lines)
    print(table)
    (root / "table.md").write_text(table + "\n")
    (root / "reports.json").write_text(json.dumps({name: report for name, report in rows}, indent=2))


if __name__ == "__main__":
    main()
