"""Latent steps sweep (Fig. 5): accuracy and generated tokens of one trained model for K = 0..max."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation.benchmarks import Benchmark, BenchmarkSample
from ..evaluation.runner import generate_batched
from .common import AnalysisSource, check_steps, mean_or_none, pyplot, save_figure


def score_generations(bench: Benchmark, samples: list[BenchmarkSample], generations: dict[str, Any]) -> dict[str, Any]:
    """Accuracy (the benchmark's answer extraction and scoring), generated tokens (all answers, and the correct
    ones: the paper's "# tokens") and the average number of latent steps of one batched generation run."""
    rows = bench.judge(samples, generations["texts"])
    report = bench.score(samples, generations["texts"])
    counts = generations["counts"]
    return {
        "accuracy": report["accuracy"],
        "per_category": report["per_category"],
        "num_samples": len(samples),
        "avg_tokens": mean_or_none(counts),
        "avg_tokens_correct": mean_or_none([c for c, row in zip(counts, rows) if row["correct"]]),
        "avg_latent_steps": mean_or_none(generations["latent_steps"]),
        "seconds": generations["seconds"],
    }


def latent_steps_sweep(
    model,
    processor,
    bench: Benchmark,
    samples: list[BenchmarkSample],
    steps: Sequence[int] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate on `samples` with each K in `steps` (default 0..max_latent_steps), batched and greedy; one row per
    K with accuracy, tokens and seconds (Fig. 5)."""
    steps = list(range(model.config.max_latent_steps + 1)) if steps is None else list(steps)
    if not steps:
        raise ValueError("steps must name at least one K, e.g. steps=[0, 1, 2, 4].")
    for k in steps:
        check_steps(model, k, "steps")
    rows = []
    for k in steps:
        generations = generate_batched(
            model, processor, samples, k, batch_size, max_new_tokens or bench.max_new_tokens, progress
        )
        rows.append({"num_latent_steps": k, **score_generations(bench, samples, generations)})
    return {"analysis": "latent_steps_sweep", "benchmark": bench.name, "rows": rows}


def steps_sweep_series(report: dict[str, Any]) -> dict[str, list]:
    """What Fig. 5 draws against K: accuracy, and the generated tokens averaged over the correct answers, as the
    paper's "# tokens" is (`avg_tokens_correct`; None where no answer at that K is correct)."""
    rows = report["rows"]
    return {
        "num_latent_steps": [row["num_latent_steps"] for row in rows],
        "accuracy": [row["accuracy"] for row in rows],
        "tokens_correct": [row["avg_tokens_correct"] for row in rows],
    }


def plot_steps_sweep(report: dict[str, Any], path: str | Path, title: str | None = None) -> str:
    """Fig. 5-style PNG: accuracy (left axis) and generated tokens of the correct answers (right axis) against K
    (`steps_sweep_series`)."""
    plt = pyplot()

    series = steps_sweep_series(report)
    ks = series["num_latent_steps"]
    fig, accuracy_axis = plt.subplots(figsize=(5.0, 3.4))
    accuracy_axis.plot(ks, series["accuracy"], "o-", color="tab:blue", label="accuracy")
    accuracy_axis.set_xlabel("latent steps K")
    accuracy_axis.set_ylabel("accuracy (%)", color="tab:blue")
    accuracy_axis.set_xticks(ks)
    token_axis = accuracy_axis.twinx()
    drawn = [(k, tokens) for k, tokens in zip(ks, series["tokens_correct"]) if tokens is not None]
    if drawn:
        token_axis.plot(*zip(*drawn), "s--", color="tab:orange", label="generated tokens (correct answers)")
    token_axis.set_ylabel("generated tokens (mean, correct answers)", color="tab:orange")
    accuracy_axis.set_title(title or f"Latent steps sweep ({report.get('benchmark', '')})", fontsize=10)
    return save_figure(fig, path)


def run(
    source: AnalysisSource,
    output: Path,
    steps: Sequence[int] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """`lare analyze steps`: the sweep over K of `source` and its figure (``steps.png`` in `output`)."""
    bench, samples, model, processor = source.load()
    report = latent_steps_sweep(model, processor, bench, samples, steps, batch_size, max_new_tokens)
    report["figure"] = plot_steps_sweep(report, output / "steps.png")
    return {**source.header(), **report}


__all__ = ["latent_steps_sweep", "plot_steps_sweep", "score_generations", "steps_sweep_series"]
