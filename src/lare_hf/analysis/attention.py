"""Attention to the image (Table 5): how much the first generated token attends to the visual tokens, LaRe against
the model without latent steps, with Student's t-test (means) and the Mann-Whitney U test (medians)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation.benchmarks import BenchmarkSample
from .common import AnalysisSource, check_steps, load_model, prompt_inputs, pyplot, save_figure

PERCENTILES = (25, 50, 75, 95)


@torch.no_grad()
def attention_to_image(
    model, processor, samples: list[BenchmarkSample], num_latent_steps: int | None = None, batch_size: int = 16
) -> np.ndarray:
    """Per sample, the attention of the first generated token (greedy) to the image tokens: the attention weights of
    its position summed over the image-token keys, averaged over heads and layers, in percent. The model must run
    eager attention (load it with `attn_implementation="eager"`), which returns the weights."""
    implementation = model.config.get_text_config()._attn_implementation
    if implementation != "eager":
        raise ValueError(
            f"attention_to_image reads attention weights, which the {implementation!r} attention does not return; "
            "load the model with attn_implementation='eager' (lare_hf.analysis.load_model(..., "
            "attn_implementation='eager'))."
        )
    steps = processor.num_latent_steps if num_latent_steps is None else num_latent_steps
    check_steps(model, steps)
    scores = []
    for start in range(0, len(samples), batch_size):
        inputs = prompt_inputs(model, processor, samples[start : start + batch_size], steps)
        output = model.generate(
            **inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, output_attentions=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        # generation step 1 feeds the first generated token: per layer [batch, heads, 1, keys]
        layers = torch.stack([layer[:, :, -1].float() for layer in output.attentions[1]], dim=1)
        image_keys = inputs["input_ids"] == model.config.image_token_id
        image_keys = torch.cat(
            [image_keys, image_keys.new_zeros(image_keys.shape[0], layers.shape[-1] - image_keys.shape[1])], 1
        )
        mass = (layers * image_keys[:, None, None, :]).sum(-1)  # [batch, layers, heads]
        scores.append(100.0 * mass.mean(dim=(1, 2)).cpu())
    return torch.cat(scores).numpy()


def summarize(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    return {
        "mean": float(values.mean()),
        **{f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES},
        "n": len(values),
    }


def compare_attention(lare: np.ndarray, baseline: np.ndarray) -> dict[str, Any]:
    """Table 5: statistics of both distributions, Student's two-sample t-test (equal variances, means) and the
    two-sided Mann-Whitney U test (medians) with their p-values (scipy)."""
    from scipy import stats

    lare, baseline = np.asarray(lare, dtype=float), np.asarray(baseline, dtype=float)
    if len(lare) < 2 or len(baseline) < 2:
        raise ValueError(f"The tests need at least 2 samples per model, got {len(lare)} and {len(baseline)}.")
    t_test = stats.ttest_ind(lare, baseline, equal_var=True)
    u_test = stats.mannwhitneyu(lare, baseline, alternative="two-sided")
    return {
        "lare": summarize(lare),
        "baseline": summarize(baseline),
        "t_test": {"statistic": float(t_test.statistic), "p_value": float(t_test.pvalue)},
        "mann_whitney_u": {"statistic": float(u_test.statistic), "p_value": float(u_test.pvalue)},
    }


def plot_attention(lare: np.ndarray, baseline: np.ndarray, path: str | Path, labels=("K=0 model", "LaRe")) -> str:
    """Box plot of the two distributions of attention to the image."""
    plt = pyplot()

    fig, axis = plt.subplots(figsize=(4.2, 3.4))
    axis.boxplot([np.asarray(baseline), np.asarray(lare)], showmeans=True)
    axis.set_xticks([1, 2], list(labels))
    axis.set_ylabel("attention to image tokens (%)")
    axis.set_title("First generated token's attention to the image", fontsize=9)
    return save_figure(fig, path)


def run(
    source: AnalysisSource,
    output: Path,
    baseline: str,
    num_latent_steps: int | None = None,
    baseline_num_latent_steps: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """`lare analyze attention`: Table 5, the first answer token's attention to the image of the LaRe checkpoint of
    `source` against the `baseline` checkpoint (the K=0 model), and its figure (``attention.png`` in `output`)."""
    _, samples, model, processor = source.load(attn_implementation="eager")
    baseline_model, baseline_processor = load_model(baseline, source.device, attn_implementation="eager")
    lare = attention_to_image(model, processor, samples, num_latent_steps, batch_size)
    plain = attention_to_image(baseline_model, baseline_processor, samples, baseline_num_latent_steps, batch_size)
    report = {
        "analysis": "attention_to_image",
        "baseline_model": str(baseline),
        "num_latent_steps": processor.num_latent_steps if num_latent_steps is None else num_latent_steps,
        "baseline_num_latent_steps": baseline_num_latent_steps,
        **compare_attention(lare, plain),
    }
    report["figure"] = plot_attention(lare, plain, output / "attention.png")
    return {**source.header(), **report}


__all__ = ["attention_to_image", "compare_attention", "plot_attention", "summarize"]
