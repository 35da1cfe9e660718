"""Semantic augmentation losses of LaRe (Sec. 3.2): symmetric alignment (Eq. 6) and text prefix reconstruction (Eq. 8).

Everything here is pure torch so that it ships as Hub custom code next to `modeling_lare.py`.

- `mean_max_pool`: the "hybrid mean-max pooling" of Appendix B (probing analysis), used to turn a token sequence
  (latents Z, rationale hidden states T, window visual features V) into one vector per sample.
- `info_nce` / `symmetric_info_nce`: InfoNCE with in-batch negatives, one direction / both directions (Eq. 6).
- `LaReAlignmentHead`: holds the temperature tau and computes L_sym = L_{Z<->T} + L_{Z<->V}.
- `text_prefix_loss`: cross-entropy of the rationale prefix predicted from the latents (Eq. 8), padding ignored.

Similarities and cross-entropies are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.initialization import constant_

# CLIP's clamp: the learned logit scale 1/tau never exceeds 100.
MAX_LOGIT_SCALE = 100.0


def mean_max_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hybrid mean-max pooling over the sequence dimension.

    Args:
        hidden: `[batch, length, dim]`.
        mask: `[batch, length]`, 1 (or True) for real positions and 0 for padding; None = every position is real.

    Returns:
        `[batch, 2 * dim]` in float32: the masked mean concatenated with the masked max. Padding positions take part
        in neither. A row whose mask is all zero pools to zeros (no NaN / inf). The sum behind the mean is taken in
        float32, as a float16 sum over a long sequence can overflow.
    """
    if hidden.dim() != 3:
        raise ValueError(f"mean_max_pool expects [batch, length, dim], got shape {tuple(hidden.shape)}.")
    hidden = hidden.float()
    if mask is None:
        return torch.cat([hidden.mean(dim=1), hidden.amax(dim=1)], dim=-1)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden's {tuple(hidden.shape[:2])}.")
    valid = mask.to(device=hidden.device).bool().unsqueeze(-1)  # [B, L, 1]
    counts = valid.sum(dim=1).clamp(min=1).to(hidden.dtype)  # [B, 1]
    mean = (hidden * valid.to(hidden.dtype)).sum(dim=1) / counts
    lowest = torch.finfo(hidden.dtype).min
    maxed = hidden.masked_fill(~valid, lowest).amax(dim=1)
    maxed = torch.where(valid.any(dim=1), maxed, torch.zeros_like(maxed))
    return torch.cat([mean, maxed], dim=-1)


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """One-directional InfoNCE with in-batch negatives.

    `query[i]` must pick `key[i]` among all keys of the batch: both are L2-normalised, the logits are
    `query @ key.T / temperature` and the loss is the cross-entropy against the diagonal (mean over the batch).

    Args:
        query: `[batch, dim]`.
        key: `[batch, dim]`.
        temperature: tau (float or 0-d tensor; a tensor keeps its gradient).
    """
    if query.shape != key.shape or query.dim() != 2:
        raise ValueError(
            f"info_nce expects two [batch, dim] tensors of the same shape, got {query.shape} / {key.shape}."
        )
    query = F.normalize(query.float(), dim=-1)
    key = F.normalize(key.float(), dim=-1)
    logits = query @ key.T / temperature
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, labels)


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Eq. 6: the mean of InfoNCE(a -> b) and InfoNCE(b -> a). A batch of one gives exactly 0 (finite)."""
    return 0.5 * (info_nce(a, b, temperature) + info_nce(b, a, temperature))


class LaReAlignmentHead(nn.Module):
    """Symmetric alignment (Eq. 6): L_sym = L_{Z<->T} + L_{Z<->V} on mean-max pooled sequences.

    The temperature tau comes from `config.alignment_temperature`. With `config.learnable_temperature` it is learned
    CLIP-style: the parameter `logit_scale` stores log(1/tau) and is clamped when used so that 1/tau <= 100. Without
    it the head has no parameters at all and tau is a plain float (nothing in the state dict).

    The owning `PreTrainedModel` should call `reset_parameters()` from its `_init_weights` (the generic transformers
    initialisation does not know `logit_scale`).
    """

    def __init__(self, config):
        super().__init__()
        self.initial_temperature = float(config.alignment_temperature)
        if self.initial_temperature <= 0:
            raise ValueError(f"alignment_temperature must be > 0, got {self.initial_temperature}.")
        self.learnable_temperature = bool(config.learnable_temperature)
        if self.learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.initial_temperature)))
        else:
            self.logit_scale = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """log(1/tau) from the config. Uses transformers' `initialization.constant_`, which leaves a parameter that
        `from_pretrained` already loaded (flagged `_is_hf_initialized`) untouched, so it is safe in `_init_weights`."""
        if self.logit_scale is not None:
            constant_(self.logit_scale, math.log(1.0 / self.initial_temperature))

    @property
    def temperature(self) -> torch.Tensor | float:
        """tau: a 0-d tensor with gradient when learnable, else the configured float."""
        if self.logit_scale is None:
            return self.initial_temperature
        return 1.0 / self.logit_scale.float().clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(
        self,
        latents: torch.Tensor,
        latent_mask: torch.Tensor | None,
        text_hidden: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """
        Args:
            latents: latent tokens Z `[batch, Lz, D]` (all K steps concatenated), `latent_mask` `[batch, Lz]` or None.
            text_hidden: LLM hidden states of the explicit rationale T `[batch, Lt, D]`, `text_mask` `[batch, Lt]`;
                `text_hidden=None` skips the text term (then `z_t` is None and `total = z_v`).
            visual: window visual features V `[batch, Lv, D]`, `visual_mask` `[batch, Lv]` or None.

        Returns:
            `(total, z_t, z_v)` with `z_t = symmetric_info_nce(pool(Z), pool(T))`,
            `z_v = symmetric_info_nce(pool(Z), pool(V))` and `total = z_t + z_v` (float32 scalars).
        """
        tau = self.temperature
        pooled_latents = mean_max_pool(latents, latent_mask)
        z_v = symmetric_info_nce(pooled_latents, mean_max_pool(visual, visual_mask), tau)
        if text_hidden is None:
            return z_v, None, z_v
        z_t = symmetric_info_nce(pooled_latents, mean_max_pool(text_hidden, text_mask), tau)
        return z_t + z_v, z_t, z_v

    def extra_repr(self) -> str:
        return f"temperature={self.initial_temperature}, learnable={self.learnable_temperature}"


def text_prefix_loss(logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 8: cross-entropy of the rationale prefix, padding ignored.

    Args:
        logits: `[batch, P, vocab]`, `logits[:, i]` predicts `target_ids[:, i]` (already aligned, no shift here).
        target_ids: `[batch, P]`.
        target_mask: `[batch, P]`, 1 for real tokens, 0 for padding.

    Returns:
        The mean cross-entropy over the real target tokens (float32). When every target is padding the result is a
        zero that is still connected to `logits` (so backward and DDP stay happy).
    """
    if logits.shape[:2] != target_ids.shape or target_mask.shape != target_ids.shape:
        raise ValueError(
            f"text_prefix_loss: logits {tuple(logits.shape)}, target_ids {tuple(target_ids.shape)} and target_mask "
            f"{tuple(target_mask.shape)} must agree on [batch, P]."
        )
    valid = target_mask.to(device=logits.device).bool()
    labels = target_ids.to(logits.device).masked_fill(~valid, -100)
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    count = valid.sum().clamp(min=1)
    # A zero tied to `logits` for the all-padding case, summed in float32: a half-precision sum over a real
    # vocabulary overflows to inf, and inf * 0 is NaN.
    return total / count + logits.float().sum() * 0.0


__all__ = [
    "LaReAlignmentHead",
    "MAX_LOGIT_SCALE",
    "info_nce",
    "mean_max_pool",
    "symmetric_info_nce",
    "text_prefix_loss",
]
