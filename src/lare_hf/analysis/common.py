"""What every analysis shares: loading a checkpoint and a benchmark, prompts with K latent steps, reports."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..destinations import check_lare_checkpoint
from ..evaluation.benchmarks import Benchmark, BenchmarkSample, get_benchmark
from ..evaluation.runner import prompt_inputs


def load_model(model_dir: str, device: str | None = None, attn_implementation: str | None = None):
    """(model, processor) of a LaRe checkpoint folder, in eval mode (on `device` when given)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import lare_hf  # noqa: F401  (registers the "lare" Auto classes)

    check_lare_checkpoint(model_dir, "--model")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs).eval()
    if device is not None:
        model = model.to(device)
    return model, AutoProcessor.from_pretrained(model_dir)


def load_samples(
    benchmark: str, data: str, limit: int | None = None, split: str | None = None, image_folder: str | None = None
) -> tuple[Benchmark, list[BenchmarkSample]]:
    """The benchmark (its loader, answer extraction and scoring) and its samples from `data`."""
    bench = get_benchmark(benchmark)
    samples = bench.load(data, split=split, image_folder=image_folder, limit=limit)
    if not samples:
        raise ValueError(f"{data} holds no {bench.name} sample to analyse.")
    return bench, samples


@dataclass(frozen=True)
class AnalysisSource:
    """What an analysis runs on: a checkpoint and a benchmark file, as every `lare analyze` command takes them."""

    model: str
    data: str
    benchmark: str = "refocus_chains"
    limit: int | None = None
    split: str | None = None
    image_folder: str | None = None
    device: str | None = None

    def load(self, attn_implementation: str | None = None):
        """(benchmark, samples, model, processor); the data is read first, so that a wrong file fails fast."""
        bench, samples = load_samples(self.benchmark, self.data, self.limit, self.split, self.image_folder)
        model, processor = load_model(self.model, self.device, attn_implementation=attn_implementation)
        return bench, samples, model, processor

    def header(self) -> dict[str, str]:
        """The report's first fields: the checkpoint and the data."""
        return {"model": str(self.model), "data": str(self.data)}


def check_steps(model, num_latent_steps: int, name: str = "num_latent_steps") -> int:
    """K within 0..max_latent_steps of the model."""
    maximum = model.config.max_latent_steps
    if isinstance(num_latent_steps, bool) or not isinstance(num_latent_steps, int):
        raise ValueError(f"{name} must be an integer in 0..{maximum}, got {num_latent_steps!r}.")
    if not 0 <= num_latent_steps <= maximum:
        raise ValueError(f"{name} must be in 0..max_latent_steps={maximum} of this model, got {num_latent_steps}.")
    return num_latent_steps


def model_view(model, image) -> Any:
    """The image as the model saw it: RGB at the vision tower's input size."""
    from PIL import Image

    size = model.config.vision_config.image_size
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


def pyplot():
    """matplotlib's pyplot on the Agg backend: the analyses write their figures to files and never show them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> str:
    """Lay out, write and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return str(path)


def mean_or_none(values: list[float]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """The report as indented JSON (tensors, numpy values converted; NaN / inf written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=2))
    return path


__all__ = [
    "AnalysisSource",
    "check_steps",
    "load_model",
    "load_samples",
    "model_view",
    "prompt_inputs",
    "write_report",
]
