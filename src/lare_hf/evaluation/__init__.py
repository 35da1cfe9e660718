"""Benchmarks (MMBench, MMStar, MMVP, ScienceQA, POPE, RefocusShapes) and the `lare eval` runner."""

from pathlib import Path

from .benchmarks import BENCHMARKS, Benchmark, BenchmarkSample, get_benchmark
from .runner import evaluate

EVALUATE_METRICS_DIR = Path(__file__).resolve().parent / "evaluate_metrics"


def metric_path(name: str) -> str:
    """Folder of a benchmark scorer packaged as a Hugging Face `evaluate` module, for
    `evaluate.load(metric_path(name))` (offline): "pope", "mmvp_pairs", "mmbench_circular" or "refocus_shapes"."""
    available = sorted(path.name for path in EVALUATE_METRICS_DIR.iterdir() if (path / f"{path.name}.py").is_file())
    if name not in available:
        raise ValueError(f"Unknown evaluate module {name!r}; available: {', '.join(available)}.")
    return str(EVALUATE_METRICS_DIR / name)


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkSample", "evaluate", "get_benchmark", "metric_path"]
