"""Small-scale reproduction of the paper's Tables 1 and 3 on RefocusChains, on CPU (see lare_hf.reproduction).

    python benchmarks/reproduce.py --quick --seed 0 --output outputs/reproduce-quick
    python benchmarks/reproduce.py --seeds 0 1 2 --variants k0 cot lare lare_answer lare_steps \\
        no_extractor no_window no_sym no_img no_text lare_k1 lare_k2 --output outputs/reproduce

Per seed: writes the data (train / held-out test / alignment captions), runs the alignment stage once, trains every
variant from its weights with one budget, evaluates on the held-out boards, and writes ``seed{S}/results.json``
and ``seed{S}/predictions_{variant}.jsonl``. Then ``DIR/results.json`` (schema below; with several seeds the
figures are means and each carries its std and 95% Student-t confidence interval), ``DIR/results.md`` (the table)
and ``DIR/results.png`` (accuracy by chain length, window-hit rate by latent step).

    {"variants": {NAME: {"accuracy": %, "accuracy_by_hops": {"1": %, ...}, "tokens_correct": mean generated tokens
     on correct answers, "window_hit_rate": % or null, "train_seconds": s, the settings that define the variant
     ("num_latent_steps", "response_format", "window_loss_weight", "window_selection", "window_temperature",
     "window_temperature_end", "overrides", ...), ...}}, "config": {...}, "seeds": [...]}
    Each ``seed{S}/results.json`` also holds, for a relaxed window selection (not in the paper), the temperature and
    the gradient norm that reached each latent step's saliency at every training step (``window_selection_history``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lare_hf.data.refocus_chains import CAPTION_LOOKUP_FRACTION, write_refocus_chains
from lare_hf.reproduction import (
    ABLATIONS,
    ALIGN_LEARNING_RATE,
    VARIANT_LEARNING_RATE,
    VARIANTS,
    WINDOW_SETTINGS,
    mean_std_ci,
    run_variant,
    train_alignment,
    variant,
)

QUICK = dict(num_train=3000, num_test=300, num_captions=3000, align_steps=1000, steps=400, hops=[1, 2, 3])
# the label-free window selection in --quick (not in the paper): Gumbel, the estimator that came closest (its step-1
# window on the needed cell in 51% of questions over 3 seeds, straight-through 18% and soft 0% on seed 0; no
# label-free variant beat K=0: docs/reproduction.md, "Label-free window selection"); it takes lare_steps' place
QUICK_VARIANTS = ["k0", "cot", "lare", "lare_answer", "lare_gumbel_answer"]
METRICS = ("accuracy", "tokens_correct", "window_hit_rate", "train_seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output", required=True, help="results folder (refused if it holds results, see --overwrite)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one seed, {QUICK_VARIANTS}, 400 steps per variant (data and alignment as the full run)",
    )
    parser.add_argument("--seed", type=int, default=None, help="one seed (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds (mean, std, 95%% CI)")
    parser.add_argument("--variants", nargs="+", default=None, help=f"{sorted(VARIANTS)}, {sorted(ABLATIONS)}, "
                        "lare_k{K}, lare_answer_k{K}, lare_steps_k{K}")  # fmt: skip
    parser.add_argument("--ablation-base", default="lare", help="the LaRe variant the ablations modify")
    parser.add_argument("--hops", type=int, nargs="+", default=None, help="chain lengths (default 1 2 3)")
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--num-captions", type=int, default=None)
    parser.add_argument("--caption-lookup-fraction", type=float, default=CAPTION_LOOKUP_FRACTION,
                        help="share of one-cell lookup captions in the alignment data")  # fmt: skip
    parser.add_argument("--align-steps", type=int, default=None, help="alignment-stage steps (0: none)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every variant")
    parser.add_argument(
        "--curriculum-steps",
        type=int,
        default=0,
        help="the first that many of --steps train on one-hop questions only (a chain-length curriculum, not in "
        "the paper)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=VARIANT_LEARNING_RATE,
                        help="AdamW peak learning rate of every variant")  # fmt: skip
    parser.add_argument("--align-learning-rate", type=float, default=ALIGN_LEARNING_RATE,
                        help="peak learning rate of the alignment stage")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is fastest next to other jobs)")
    parser.add_argument("--save-models", action="store_true", help="keep each trained variant in seed{S}/{name}/model")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that holds results")
    args = parser.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    args.seeds = args.seeds or [0 if args.seed is None else args.seed]
    full = dict(num_train=3000, num_test=300, num_captions=3000, align_steps=1000, steps=500, hops=[1, 2, 3])
    for key, value in (QUICK if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.variants is None:
        args.variants = QUICK_VARIANTS
    for name in args.variants:
        variant(name, args.ablation_base)  # unknown names fail before any training
    if not 0 <= args.curriculum_steps <= args.steps:
        parser.error(f"--curriculum-steps must be in 0..--steps ({args.steps}), got {args.curriculum_steps}")
    if args.curriculum_steps and 1 not in args.hops:
        parser.error(f"--curriculum-steps needs one-hop questions; add 1 to --hops (got {args.hops})")
    return args


def run_seed(args: argparse.Namespace, seed: int, root: Path) -> dict:
    data = write_refocus_chains(
        root / "data", args.num_train, args.num_test, seed=seed, hops=args.hops, num_captions=args.num_captions,
        caption_lookup_fraction=args.caption_lookup_fraction,
    )  # fmt: skip
    init_state, alignment = None, None
    if args.align_steps > 0:
        init_state, summary = train_alignment(
            data["captions"], root / "alignment", args.align_steps, args.batch_size, args.align_learning_rate, seed
        )
        alignment = {"steps": args.align_steps, "train_seconds": summary["seconds"], "losses": summary["losses"]}
        print(f"[seed {seed}] alignment: {args.align_steps} steps in {summary['seconds']:.0f}s, "
              f"loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}", flush=True)  # fmt: skip
    results = {}
    for name in args.variants:
        spec = variant(name, args.ablation_base)
        result = run_variant(
            spec, data, root / name, args.steps, args.batch_size, args.learning_rate, seed, init_state,
            save_model=args.save_models, curriculum_steps=args.curriculum_steps,
        )  # fmt: skip
        with open(root / f"predictions_{name}.jsonl", "w") as handle:
            for row in result.pop("rows"):
                handle.write(json.dumps(row) + "\n")
        results[name] = result
        hit = result.get("window_hit_rate")
        print(f"[seed {seed}] {name}: accuracy {result['accuracy']:.1f}% by hops {result['accuracy_by_hops']}, "
              f"tokens(correct) {result['tokens_correct']}, window hits "
              f"{'-' if hit is None else f'{hit:.1f}%'} {result.get('window_hit_rate_by_step', '')}, "
              f"{result['train_seconds']:.0f}s", flush=True)  # fmt: skip
    report = {"seed": seed, "alignment": alignment, "variants": results}
    (root / "results.json").write_text(json.dumps(report, indent=2))
    return report


def aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds of every figure, with its std and 95% CI (`mean_std_ci`)."""
    out = {}
    for name in per_seed[0]["variants"]:
        runs = [report["variants"][name] for report in per_seed]
        entry = {"description": runs[0]["description"], "num_latent_steps": runs[0]["num_latent_steps"],
                 "response_format": runs[0]["response_format"], "num_test": runs[0]["num_test"]}  # fmt: skip
        # the settings that define the variant (`variant_settings`)
        for key in ("latent_losses", "step_supervision", "coconut", *WINDOW_SETTINGS, "overrides"):
            entry[key] = runs[0].get(key)
        for metric in METRICS:
            stats = mean_std_ci([run.get(metric) for run in runs])
            entry[metric] = stats["mean"]
            entry[f"{metric}_std"], entry[f"{metric}_ci95"] = stats["std"], [stats["ci_low"], stats["ci_high"]]
        for key in ("accuracy_by_hops", "window_hit_rate_by_step"):
            if runs[0].get(key):
                groups = runs[0][key]
                entry[key] = {str(g): mean_std_ci([run[key][g] for run in runs])["mean"] for g in groups}
                entry[f"{key}_ci95"] = {
                    str(g): [mean_std_ci([run[key][g] for run in runs])[b] for b in ("ci_low", "ci_high")]
                    for g in groups
                }
            else:
                entry[key] = None
        entry["per_seed"] = {str(report["seed"]): {m: report["variants"][name].get(m) for m in METRICS}
                             for report in per_seed}  # fmt: skip
        out[name] = entry
    return out


def _fmt(value, ci=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.1f}"
    if ci and ci[0] is not None:
        text += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    return text


def markdown_table(results: dict, args: argparse.Namespace, wall_seconds: float) -> str:
    hops = [str(h) for h in args.hops]
    lines = [
        f"RefocusChains held-out boards ({args.num_test} questions per seed, hops {', '.join(hops)}); seeds "
        f"{args.seeds}; alignment {args.align_steps} steps at lr {args.align_learning_rate} "
        f"({args.caption_lookup_fraction:.0%} lookup captions), then {args.steps} steps x batch {args.batch_size} per "
        f"variant ({args.curriculum_steps} of them on one-hop questions first), lr {args.learning_rate}. Mean over seeds [95% CI]. Wall time {wall_seconds / 60:.1f} min.",
        "",
        "| variant | K | target | accuracy (%) | " + " | ".join(f"h={h}" for h in hops)
        + " | # tokens (correct) | window hits (%) | train s |",
        "|---|---|---|---|" + "---|" * len(hops) + "---|---|---|",
    ]  # fmt: skip
    for name, entry in results.items():
        by_hops = entry["accuracy_by_hops"] or {}
        lines.append(
            f"| {name} | {entry['num_latent_steps']} | {entry['response_format']} | "
            f"{_fmt(entry['accuracy'], entry['accuracy_ci95'])} | "
            + " | ".join(_fmt(by_hops.get(h)) for h in hops)
            + f" | {_fmt(entry['tokens_correct'])} | {_fmt(entry['window_hit_rate'], entry['window_hit_rate_ci95'])}"
            f" | {_fmt(entry['train_seconds'])} |"
        )
    return "\n".join(lines)


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = [str(h) for h in args.hops]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(results))
    for index, (name, entry) in enumerate(results.items()):
        means = [(entry["accuracy_by_hops"] or {}).get(h) or 0.0 for h in hops]
        cis = entry.get("accuracy_by_hops_ci95") or {}
        errors = [[max(0.0, m - (cis.get(h, [None])[0] if cis.get(h, [None])[0] is not None else m)) for h, m in
                   zip(hops, means)],
                  [max(0.0, (cis.get(h, [None, None])[1] if cis.get(h, [None, None])[1] is not None else m) - m)
                   for h, m in zip(hops, means)]]  # fmt: skip
        positions = [i + (index - (len(results) - 1) / 2) * width for i in range(len(hops))]
        left.bar(positions, means, width, yerr=errors, capsize=2, label=name)
    left.axhline(100 / 9, color="grey", linestyle=":", linewidth=1, label="chance (1/9)")
    left.set_xticks(range(len(hops)), [f"h={h}" for h in hops])
    left.set_ylabel("held-out accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title("Accuracy by chain length (mean over seeds, 95% CI)")
    left.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below the bars, never over them
    for name, entry in results.items():
        by_step = entry.get("window_hit_rate_by_step")
        if by_step:
            steps = sorted(by_step, key=int)
            right.plot([int(s) for s in steps], [by_step[s] for s in steps], marker="o", label=name)
    right.axhline(100 / 9, color="grey", linestyle=":", linewidth=1, label="chance (1/9)")
    right.set_xticks([int(h) for h in hops])
    right.set_xlabel("latent step k")
    right.set_ylabel("window on the cell step k reads (%)")
    right.set_ylim(0, 105)
    right.set_title("Window-hit rate by latent step")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.output)
    if (root / "results.json").exists() and not args.overwrite:
        print(f"error: {root / 'results.json'} exists; pass --overwrite or another --output", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    per_seed = [run_seed(args, seed, root / f"seed{seed}") for seed in args.seeds]
    wall = time.perf_counter() - started
    results = aggregate(per_seed)
    config = {key: getattr(args, key) for key in ("seeds", "variants", "ablation_base", "hops", "num_train",
              "num_test", "num_captions", "caption_lookup_fraction", "align_steps", "align_learning_rate", "steps", "curriculum_steps", "batch_size", "learning_rate",
              "threads")}  # fmt: skip
    report = {"variants": results, "config": config, "seeds": args.seeds, "wall_seconds": wall,
              "command": " ".join(["python", "benchmarks/reproduce.py", *(argv if argv is not None else sys.argv[1:])])}  # fmt: skip
    (root / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(results, args, wall)
    (root / "results.md").write_text(table + "\n")
    plot(results, args, root / "results.png")
    print(table)
    print(f"wrote {root / 'results.json'}, {root / 'results.md'}, {root / 'results.png'} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
