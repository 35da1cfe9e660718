"""Benchmarks (MMBench, MMStar, MMVP, ScienceQA, POPE, RefocusShapes) and the `lare eval` runner."""

from .benchmarks import BENCHMARKS, Benchmark, BenchmarkSample, get_benchmark
from .runner import evaluate

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkSample", "evaluate", "get_benchmark"]
