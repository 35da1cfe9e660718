"""Figures of the paper's analyses: Fig. 3 (where each latent step refocused), Fig. 4 (what the latents hold, as
images), and, on RefocusChains, the window-hit rate per latent step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data.refocus_chains import GRID, window_hit_rates_by_step
from ..evaluation.benchmarks import BenchmarkSample
from ..evaluation.runner import generate_batched, refocus_record
from ..visualization import plot_refocus_grid
from .common import AnalysisSource, check_steps, model_view, pyplot, save_figure
from .reconstructor import load_reconstructor, reconstruction_targets
from .steps import plot_steps_sweep


def _check_latent_steps(model, processor, num_latent_steps: int | None) -> int:
    steps = processor.num_latent_steps if num_latent_steps is None else num_latent_steps
    check_steps(model, steps)
    if steps == 0:
        raise ValueError("This figure shows latent steps: num_latent_steps must be >= 1.")
    return steps


def refocus_figure(
    model,
    processor,
    samples: list[BenchmarkSample],
    path: str | Path,
    num_latent_steps: int | None = None,
    max_new_tokens: int = 64,
) -> str:
    """Fig. 3: per sample, one panel per latent step k with the saliency that chose step k's window and the window,
    and below it the Extractor's cross-attention inside that window (the paper's heatmaps; absent when the
    Extractor is ablated), beside the text the model generates after its latent steps (its reasoning trajectory
    for a model trained on the paper's target, the bare answer for an answer-only one; greedy, `max_new_tokens`).
    RefocusChains samples also show the cell step k needs (`lare_hf.visualization.plot_refocus_grid`)."""
    steps = _check_latent_steps(model, processor, num_latent_steps)
    record = refocus_record(model, processor, samples, steps, return_extractor_attention=True)
    generated = generate_batched(model, processor, samples, steps, len(samples), max_new_tokens, progress=False)
    needed = [s.meta.get("visited_cells") for s in samples]
    titles = [f"{s.prompt}\ngold: {s.answer}\ngenerated: {text}" for s, text in zip(samples, generated["texts"])]
    return plot_refocus_grid(
        [model_view(model, s.image) for s in samples],
        record["saliency_maps"],
        record["window_positions"],
        model.config.effective_window_size,
        str(path),
        titles=titles,
        # the cells are board cells: drawn only where a patch is a cell (the reproduction's models)
        needed_cells=needed if all(needed) and model.config.patch_grid_size == GRID else None,
        extractor_attentions=record.get("extractor_attentions"),
    )


@torch.no_grad()
def reconstruction_figure(
    model,
    processor,
    samples: list[BenchmarkSample],
    path: str | Path,
    num_latent_steps: int | None = None,
    num_inference_steps: int = 50,
    seed: int = 0,
    reconstructor=None,
) -> str:
    """Fig. 4: per sample three rows: what each step's latents are decoded towards, that image through the image
    tokenizer and back (the sharpest any decoder of these tokenizer latents can draw: a random KL-16 draws noise
    here too), and the image the decoder draws from that step's latents alone (`LaReImageReconstructor.sample`,
    seeded). The decoder is the checkpoint's reconstructor (trained by L_img, Eq. 7, on window crops: the top row is
    the crop under each step's window) or `reconstructor`, one fine-tuned by `lare_hf.analysis.reconstructor` (the
    paper's decoder; the top row is its target, the whole image or the window crop). The title names the decoder."""
    plt = pyplot()

    if model.reconstructor is None:
        raise ValueError("This checkpoint has no reconstructor (use_reconstructor=False); Fig. 4 needs one.")
    steps = _check_latent_steps(model, processor, num_latent_steps)
    record = refocus_record(model, processor, samples, steps)
    decoder = model.reconstructor if reconstructor is None else reconstructor
    metadata = getattr(reconstructor, "metadata", {})
    target = metadata.get("target", "window")
    count = len(samples)
    targets = reconstruction_targets(model, decoder, record, target)
    round_trips = decoder.decode_latents(decoder.encode_images(targets)).view(count, steps, *targets.shape[1:]).cpu()
    references = ((targets.float() + 1) / 2).clamp(0, 1).view(count, steps, *targets.shape[1:]).cpu()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    latents = record["latent_embeds"]
    images = decoder.sample(latents.reshape(-1, *latents.shape[2:]), num_inference_steps, generator)
    images = images.float().view(count, steps, *images.shape[1:]).cpu()
    label = "window crop" if target == "window" else "input image"
    fig, axes = plt.subplots(3 * count, steps, figsize=(1.7 * steps + 0.6, 1.8 * 3 * count + 0.4), squeeze=False)
    for i in range(count):
        for k in range(steps):
            rows = (
                (references[i, k], label),
                (round_trips[i, k], "tokenizer round trip"),
                (images[i, k], "from latents"),
            )
            for row, (picture, name) in enumerate(rows):
                axis = axes[3 * i + row][k]
                axis.imshow(picture.permute(1, 2, 0).numpy(), interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
                if i == 0 and row == 0:
                    axis.set_title(f"latent step {k + 1}", fontsize=8)
                if k == 0:
                    axis.set_ylabel(f"#{i + 1} {name}", fontsize=7)
    fig.suptitle(f"Images decoded from each step's latents\ndecoder: {decoder_description(reconstructor)}", fontsize=8)
    return save_figure(fig, path, dpi=110)


def decoder_description(reconstructor=None) -> str:
    """Which decoder Fig. 4 used, for its title and the report."""
    if reconstructor is None:
        return "the checkpoint's reconstructor (trained by L_img on window crops)"
    metadata = getattr(reconstructor, "metadata", {})
    return (
        f"reconstructor fine-tuned on {metadata.get('num_images')} images of {Path(str(metadata.get('images'))).name} "
        f"for {metadata.get('epochs')} epochs (target: {metadata.get('target')})"
    )


def window_hit_rates(
    model, processor, samples: list[BenchmarkSample], num_latent_steps: int | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """On RefocusChains: how often latent step k's window covers the cell reasoning step k reads
    (`lare_hf.data.refocus_chains.window_hits`), overall and per step. The model's patch grid must be the board's
    (one patch per cell, as `lare_hf.reproduction.CHAINS_MODEL_CONFIG`), so windows and cells share coordinates."""
    steps = _check_latent_steps(model, processor, num_latent_steps)
    grid = model.config.patch_grid_size
    if grid != GRID:
        raise ValueError(
            f"Window hits compare windows (patch grid {grid}x{grid}) with RefocusChains cells ({GRID}x{GRID}); they "
            "need one patch per cell (e.g. the reproduction's CHAINS_MODEL_CONFIG: 24-px images, 8-px patches)."
        )
    if not all(s.meta.get("visited_cells") for s in samples):
        raise ValueError("Window hits need RefocusChains samples (each with meta['visited_cells']).")
    windows = refocus_record(model, processor, samples, steps, batch_size)["window_positions"]
    visited = [sample.meta["visited_cells"] for sample in samples]
    return {
        "num_latent_steps": steps,
        **window_hit_rates_by_step(windows.tolist(), visited, model.config.effective_window_size),
    }


def plot_window_hits(report: dict[str, Any], path: str | Path) -> str:
    """Bar chart of the window-hit rate per reasoning step (steps beyond K count as misses)."""
    plt = pyplot()

    rates = report["window_hit_rate_by_step"]
    fig, axis = plt.subplots(figsize=(4.6, 3.2))
    axis.bar([str(k) for k in rates], list(rates.values()), color="tab:green")
    axis.set_ylim(0, 100)
    axis.set_xlabel("reasoning step k")
    axis.set_ylabel("window covers the needed cell (%)")
    axis.set_title(f"Window-hit rate per step (K = {report['num_latent_steps']})", fontsize=9)
    return save_figure(fig, path)


def run(
    source: AnalysisSource,
    output: Path,
    num_samples: int = 4,
    num_latent_steps: int | None = None,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = 16,
    sweep: str | None = None,
    reconstructor: str | None = None,
) -> dict[str, Any]:
    """`lare analyze figures`: Fig. 3 and Fig. 4 for the first `num_samples` samples of `source`, the window-hit rates
    on RefocusChains, and the steps figure of a `lare analyze steps` report `sweep` again, all into `output`. Fig. 4
    decodes with the checkpoint's reconstructor, or with the fine-tuned one in the folder `reconstructor`."""
    _, samples, model, processor = source.load()
    decoder = None if reconstructor is None else load_reconstructor(reconstructor, model)
    shown = samples[:num_samples]
    report: dict[str, Any] = {"analysis": "figures", "figures": {}}
    report["figures"]["refocus"] = refocus_figure(
        model, processor, shown, output / "fig3_refocus.png", num_latent_steps
    )
    if model.reconstructor is not None:
        report["figures"]["reconstruction"] = reconstruction_figure(
            model, processor, shown, output / "fig4_reconstruction.png", num_latent_steps, num_inference_steps, seed,
            decoder,
        )  # fmt: skip
        report["reconstruction_decoder"] = decoder_description(decoder)
        if reconstructor is not None:
            report["reconstructor"] = str(reconstructor)
    else:
        report["reconstruction_skipped"] = "the checkpoint has no reconstructor (use_reconstructor=False)"
    if source.benchmark.replace("-", "_").lower() == "refocus_chains":
        try:
            hits = window_hit_rates(model, processor, samples, num_latent_steps, batch_size)
        except ValueError as error:
            report["window_hits_skipped"] = str(error)
        else:
            report["window_hits"] = hits
            report["figures"]["window_hits"] = plot_window_hits(hits, output / "window_hits.png")
    if sweep is not None:
        report["figures"]["steps"] = plot_steps_sweep(json.loads(Path(sweep).read_text()), output / "steps.png")
    return {**source.header(), **report}


__all__ = [
    "decoder_description",
    "plot_window_hits",
    "reconstruction_figure",
    "refocus_figure",
    "refocus_record",
    "window_hit_rates",
]
