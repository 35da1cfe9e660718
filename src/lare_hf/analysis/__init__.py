"""The paper's analyses as tools (`lare analyze ...`): latent steps sweep (Fig. 5), adaptive halting (Table 4),
probing (Table 6), attention to the image (Table 5) and the figures (Fig. 3, Fig. 4, window-hit rates). Each
analysis module has a `run(...)` that `lare analyze <name>` calls: load, compute, plot, return the report.

This package imports the model; the model never imports it."""

from .attention import attention_to_image, compare_attention, plot_attention
from .common import AnalysisSource, load_model, load_samples, write_report
from .figures import plot_window_hits, reconstruction_figure, refocus_figure, refocus_record, window_hit_rates
from .halting import default_thresholds, halting_analysis, latent_step_distances, plot_halting
from .probing import (
    build_probe_pairs,
    plot_probing,
    probe_features,
    probing_analysis,
    records_for_probing,
    refocus_chains_probe_records,
    run_probes,
)
from .steps import latent_steps_sweep, plot_steps_sweep, score_generations, steps_sweep_series

__all__ = [
    "AnalysisSource",
    "attention_to_image",
    "build_probe_pairs",
    "compare_attention",
    "default_thresholds",
    "halting_analysis",
    "latent_step_distances",
    "latent_steps_sweep",
    "load_model",
    "load_samples",
    "plot_attention",
    "plot_halting",
    "plot_probing",
    "plot_steps_sweep",
    "steps_sweep_series",
    "plot_window_hits",
    "probe_features",
    "probing_analysis",
    "reconstruction_figure",
    "records_for_probing",
    "refocus_chains_probe_records",
    "refocus_figure",
    "refocus_record",
    "run_probes",
    "score_generations",
    "window_hit_rates",
    "write_report",
]
