"""The temperature schedule of the relaxed window selection and its per-step diagnostics (not in the paper).

`LaReConfig.window_selection` other than "argmax" makes the window choice differentiable in training with a
temperature tau (`refocus.relaxed_window_features`). `WindowTemperatureCallback` anneals tau geometrically from
`window_temperature` to `window_temperature_end` over training and records, at each optimizer step, tau and the norm
of the gradient that reached each latent step's saliency.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..modeling.latent_loop import LaReLatentRefocusMixin


def latent_refocus_module(model: nn.Module) -> LaReLatentRefocusMixin | None:
    """The module running the latent loop inside `model` (a LaReModel, possibly wrapped by PEFT / DDP), or None."""
    return next((module for module in model.modules() if isinstance(module, LaReLatentRefocusMixin)), None)


def scheduled_window_temperature(start: float, end: float, step: int, total_steps: int) -> float:
    """tau at optimizer step `step` (0-based) of `total_steps`: start * (end / start) ** (step / (total_steps - 1)),
    i.e. from `start` at the first step to `end` at the last, geometrically (a constant factor per step)."""
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return start * (end / start) ** progress


class WindowTemperatureCallback(TrainerCallback):
    """Anneals the relaxed window selection's tau (not in the paper) and records its diagnostics.

    Before each optimizer step, sets the latent loop's `window_temperature_now` to `scheduled_window_temperature` of
    the config's `window_temperature` -> `window_temperature_end` (constant when the end is None). After it, appends
    `{"step", "window_temperature", "saliency_gradient_norm", "window_weight_peak"}` to `history`, the last two
    being, per latent step k (from 1), the mean over that step's forward / backward passes of the norm of the
    gradient that reached step k's saliency and of the relaxed selection's largest weight (1: a hard choice). The
    model's config is not changed, so a saved checkpoint keeps the schedule it was given."""

    def __init__(self, model: nn.Module):
        self.module = latent_refocus_module(model)
        if self.module is None:
            raise ValueError(
                f"WindowTemperatureCallback needs a LaRe model; {type(model).__name__} has no latent loop."
            )
        self.history: list[dict[str, Any]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        config = self.module.config
        start, end = config.window_temperature, config.window_temperature_end
        self.module.window_temperature_now = (
            start if end is None else scheduled_window_temperature(start, end, state.global_step, state.max_steps)
        )

    def on_step_end(self, args, state, control, **kwargs):
        diagnostics = getattr(self.module, "window_selection_diagnostics", None) or {}
        entry = {"step": state.global_step, "window_temperature": self.module.window_temperature_now}
        for name in ("saliency_gradient_norm", "window_weight_peak"):
            by_step = diagnostics.get(name, {})
            entry[name] = {str(k + 1): sum(v) / len(v) for k, v in sorted(by_step.items())}
        self.history.append(entry)
        self.module.window_selection_diagnostics = {}

    def on_train_end(self, args, state, control, **kwargs):
        self.module.window_temperature_now = None  # evaluation and later runs read the config again


__all__ = ["WindowTemperatureCallback", "latent_refocus_module", "scheduled_window_temperature"]
