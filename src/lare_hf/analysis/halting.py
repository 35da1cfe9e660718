"""Adaptive halting (Table 4): average latent steps, accuracy and tokens per criterion and threshold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation.benchmarks import Benchmark, BenchmarkSample
from ..evaluation.runner import generate_batched
from ..modeling.refocus import HALTING_CRITERIA, check_latent_halting, latent_step_distance
from .common import AnalysisSource, check_steps, prompt_inputs, pyplot, save_figure
from .steps import score_generations


@torch.no_grad()
def latent_step_distances(
    model, processor, samples: list[BenchmarkSample], num_latent_steps: int, batch_size: int = 16
) -> dict[str, np.ndarray]:
    """Per criterion, `[num_samples, K - 1]`: how far Z^(k) moved from Z^(k-1) for k = 2..K in a full run with K
    steps (`latent_step_distance`: cosine similarity, or the L1 / L2 distance per element)."""
    check_steps(model, num_latent_steps)
    if num_latent_steps < 2:
        raise ValueError(f"Consecutive latent steps need num_latent_steps >= 2, got {num_latent_steps}.")
    found: dict[str, list[torch.Tensor]] = {criterion: [] for criterion in HALTING_CRITERIA}
    for start in range(0, len(samples), batch_size):
        latents = model(**prompt_inputs(model, processor, samples[start : start + batch_size], num_latent_steps))
        latents = latents.latent_embeds
        for criterion in HALTING_CRITERIA:
            values = [
                latent_step_distance(latents[:, k], latents[:, k - 1], criterion) for k in range(1, num_latent_steps)
            ]
            found[criterion].append(torch.stack(values, dim=1).cpu())
    return {criterion: torch.cat(values).numpy() for criterion, values in found.items()}


def default_thresholds(distances: Mapping[str, np.ndarray], quantiles: Sequence[float] = (0.25, 0.5, 0.75)) -> dict:
    """Thresholds spread over what the model does: quantiles of the observed consecutive-step values (for cosine the
    high quantiles, where halting is rare, first)."""
    thresholds = {}
    for criterion, values in distances.items():
        levels = [1.0 - q for q in quantiles] if criterion == "cosine" else list(quantiles)
        thresholds[criterion] = [float(np.quantile(values, q)) for q in levels]
    return thresholds


def halting_analysis(
    model,
    processor,
    bench: Benchmark,
    samples: list[BenchmarkSample],
    num_latent_steps: int | Sequence[int] | None = None,
    thresholds: Mapping[str, Sequence[float]] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = False,
    max_latent_steps: int | None = None,
) -> dict[str, Any]:
    """Table 4 in its layout: one fixed-K row per K in `num_latent_steps` (default: the processor's K), next to one
    adaptive row per criterion and threshold, run with `generate(latent_halting=...)` up to the cap
    `max_latent_steps` (default: the model's), so an adaptive row's mean steps can exceed the fixed K (the paper's
    cosine row: 5.9 steps against LaRe's 4.0). Each row gives average steps, accuracy and tokens. `thresholds`
    default to `default_thresholds` of the model's own consecutive-step values over the cap's steps, which the
    report also gives per step (the convergence trend)."""
    if num_latent_steps is None:
        fixed_steps = [processor.num_latent_steps]
    elif isinstance(num_latent_steps, int):
        fixed_steps = [num_latent_steps]
    else:
        fixed_steps = list(num_latent_steps)
    for steps in fixed_steps:
        check_steps(model, steps)
    cap = model.config.max_latent_steps if max_latent_steps is None else max_latent_steps
    check_steps(model, cap, "max_latent_steps")
    if cap < 2:
        raise ValueError(
            f"Adaptive halting compares consecutive latent steps: max_latent_steps (the cap) must be >= 2, got {cap}."
        )
    distances = latent_step_distances(model, processor, samples, cap, batch_size)
    if thresholds is None:
        thresholds = default_thresholds(distances)
    for criterion, values in thresholds.items():
        if not values:
            raise ValueError(f"thresholds[{criterion!r}] is empty; give at least one threshold per criterion.")
        for value in values:
            check_latent_halting(criterion, value)
    new_tokens = max_new_tokens or bench.max_new_tokens
    rows = []
    for steps in fixed_steps:
        fixed = generate_batched(model, processor, samples, steps, batch_size, new_tokens, progress)
        rows.append(
            {"method": f"LaRe (K={steps})", "criterion": None, "threshold": None, "max_latent_steps": steps,
             **score_generations(bench, samples, fixed)}
        )  # fmt: skip
    for criterion, values in thresholds.items():
        for threshold in values:
            generations = generate_batched(
                model, processor, samples, cap, batch_size, new_tokens, progress,
                latent_halting=criterion, latent_halting_threshold=float(threshold),
            )  # fmt: skip
            rows.append(
                {
                    "method": f"+ Adaptive ({criterion}, t={float(threshold):g}, cap {cap})",
                    "criterion": criterion,
                    "threshold": float(threshold),
                    "max_latent_steps": cap,
                    **score_generations(bench, samples, generations),
                }
            )
    trend = {criterion: values.mean(axis=0).tolist() for criterion, values in distances.items()}
    return {
        "analysis": "adaptive_halting",
        "benchmark": bench.name,
        "num_latent_steps": fixed_steps,
        "max_latent_steps": cap,
        "step_distance_by_step": {criterion: dict(zip(range(2, cap + 1), v)) for criterion, v in trend.items()},
        "rows": rows,
    }


def plot_halting(report: dict[str, Any], path: str | Path) -> str:
    """Accuracy against average latent steps, one line per criterion, the fixed-K run as a star."""
    plt = pyplot()

    fig, axis = plt.subplots(figsize=(5.0, 3.4))
    rows = report["rows"]
    for criterion in HALTING_CRITERIA:
        chosen = sorted((r for r in rows if r["criterion"] == criterion), key=lambda r: r["avg_latent_steps"])
        if chosen:
            axis.plot([r["avg_latent_steps"] for r in chosen], [r["accuracy"] for r in chosen], "o-", label=criterion)
    fixed = [row for row in rows if row["criterion"] is None]
    for index, row in enumerate(fixed):
        label = "fixed K" if index == 0 else None
        axis.plot([row["avg_latent_steps"]], [row["accuracy"]], "k*", markersize=12, label=label)
    axis.set_xlabel("average latent steps")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(f"Adaptive halting ({report.get('benchmark', '')})", fontsize=10)
    axis.legend(fontsize=8)
    return save_figure(fig, path)


def run(
    source: AnalysisSource,
    output: Path,
    num_latent_steps: int | Sequence[int] | None = None,
    thresholds: Mapping[str, Sequence[float]] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    max_latent_steps: int | None = None,
) -> dict[str, Any]:
    """`lare analyze halting`: Table 4 on `source` (fixed-K rows, adaptive rows capped at `max_latent_steps`) and
    its figure (``halting.png`` in `output`)."""
    bench, samples, model, processor = source.load()
    report = halting_analysis(
        model, processor, bench, samples, num_latent_steps, thresholds, batch_size, max_new_tokens,
        max_latent_steps=max_latent_steps,
    )  # fmt: skip
    report["figure"] = plot_halting(report, output / "halting.png")
    return {**source.header(), **report}


__all__ = ["default_thresholds", "halting_analysis", "latent_step_distances", "plot_halting"]
