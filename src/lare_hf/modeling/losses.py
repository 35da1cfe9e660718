"""Semantic augmentation losses of LaRe (Sec. 3.2): symmetric alignment (Eq. 6) and text prefix reconstruction (Eq. 8).

Everything here is pure torch so that it ships as Hub custom code next to `modeling_lare.py`.

- `mean_max_pool`: the "hybrid mean-max pooling" of Appendix B (probing analysis), used to turn a token sequence
  (latents Z, rationale hidden states T, window visual features V) into one vector per sample.
- `gather_rows`: every process's rows under `torch.distributed` (gradient to the local rows), so that the in-batch
  negatives of L_sym are those of the global batch.
- `info_nce` / `symmetric_info_nce`: InfoNCE with in-batch negatives, one direction / both directions (Eq. 6).
- `LaReAlignmentHead`: holds the temperature tau and computes L_sym = L_{Z<->T} + L_{Z<->V}.
- `text_prefix_loss`: cross-entropy of the rationale prefix predicted from the latents (Eq. 8), padding ignored.

Similarities and cross-entropies are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather as differentiable_all_gather
from transformers.initialization import constant_
from transformers.utils import logging

logger = logging.get_logger(__name__)

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


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The rows of `tensor` from every process, concatenated in rank order (the global batch).

    Without an initialised `torch.distributed` process group, or with a world size of 1, this is `(tensor, 0, 1)`.
    Otherwise the per-rank row counts are gathered first, so ranks may hold different numbers of rows (each pads to the
    largest, the padding is dropped after the gather), and the rows go through
    `torch.distributed.nn.functional.all_gather`: the gradient flows back to this rank's rows, summed over the losses
    of all ranks. The default (world) group is used, i.e. every process is taken to hold different samples (data
    parallelism: DDP, FSDP, DeepSpeed ZeRO).

    Args:
        tensor: `[batch, ...]`, this rank's rows.

    Returns:
        `(gathered, offset, world_size)`: `gathered` is `[global_batch, ...]` and `gathered[offset:offset + batch]`
        are this rank's rows.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0, 1
    world_size, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(count) for count in sizes]
    padding = [0, 0] * (tensor.dim() - 1) + [0, max(sizes) - tensor.shape[0]]
    parts = differentiable_all_gather(F.pad(tensor, padding))
    gathered = torch.cat([part[:count] for part, count in zip(parts, sizes)])
    return gathered, sum(sizes[:rank]), world_size


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: torch.Tensor | float,
    positive_offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """One-directional InfoNCE with in-batch negatives.

    `query[i]` must pick `key[positive_offset + i]` among all keys: both are L2-normalised, the logits are
    `query @ key.T / temperature` and the loss is the cross-entropy against those positives.

    Args:
        query: `[batch, dim]`.
        key: `[num_keys, dim]` with `num_keys >= positive_offset + batch` (the same batch, or the global batch of
            which the queries are rows `positive_offset:positive_offset + batch`).
        temperature: tau (float or 0-d tensor; a tensor keeps its gradient).
        positive_offset: the index of the first query's positive key.
        reduction: `"mean"` or `"sum"` over the queries.
    """
    if query.dim() != 2 or key.dim() != 2 or query.shape[1] != key.shape[1]:
        raise ValueError(
            f"info_nce expects query [batch, dim] and key [num_keys, dim] of the same dim, got {tuple(query.shape)} / "
            f"{tuple(key.shape)}."
        )
    if positive_offset < 0 or positive_offset + query.shape[0] > key.shape[0]:
        raise ValueError(
            f"info_nce: positive_offset={positive_offset} with {query.shape[0]} queries needs at least "
            f"{positive_offset + query.shape[0]} keys, got {key.shape[0]}; the positives must be keys."
        )
    query = F.normalize(query.float(), dim=-1)
    key = F.normalize(key.float(), dim=-1)
    logits = query @ key.T / temperature
    labels = torch.arange(positive_offset, positive_offset + query.shape[0], device=query.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Eq. 6: the mean of InfoNCE(a -> b) and InfoNCE(b -> a) over the global batch.

    Under `torch.distributed` (initialised, world size > 1) the negatives come from every process (`gather_rows`):
    this rank's rows are the queries, the keys are the global batch. Each rank returns
    `world_size / global_batch * (sum of its queries' losses)`, so that the mean over the ranks, which is what DDP's
    gradient averaging optimises, is exactly the single-process loss of the concatenated batch, also when ranks hold
    different numbers of rows (a rank may hold none). The same holds for the gradients: after DDP's mean, every parameter (and the temperature)
    gets the single-process gradient. (The gradient that reaches this rank's `a` / `b` before that mean is
    `world_size` times the single-process one, as for any loss under DDP.)

    A global batch of one has no negative: the loss is then exactly 0 (finite, zero gradient) and a warning that L_sym
    is inactive is logged once per process. A warning rather than an error, so that the last short batch of an epoch
    or an evaluation at batch 1 still runs.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"symmetric_info_nce expects two [batch, dim] tensors of the same shape, got {tuple(a.shape)} / "
            f"{tuple(b.shape)}."
        )
    both, offset, world_size = gather_rows(torch.cat([a.float(), b.float()], dim=-1))
    global_a, global_b = both.split(a.shape[1], dim=-1)
    global_batch = both.shape[0]
    if global_batch == 0:  # no sample anywhere: a zero tied to the inputs, so backward and DDP still run
        return both.sum() * 0.0
    if global_batch == 1:
        logger.warning_once(
            "The symmetric alignment loss L_sym (Eq. 6) is inactive: the global batch holds one sample, so there is "
            "no in-batch negative and the loss is 0 with no gradient. Use a batch of at least 2 samples in total "
            "(per-device batch x processes; negatives are gathered across processes)."
        )
    summed = info_nce(a, global_b, temperature, offset, reduction="sum") + info_nce(
        b, global_a, temperature, offset, reduction="sum"
    )
    return 0.5 * summed * (world_size / global_batch)


class LaReAlignmentHead(nn.Module):
    """Symmetric alignment (Eq. 6): L_sym = L_{Z<->T} + L_{Z<->V} on mean-max pooled sequences.

    The temperature tau comes from `config.alignment_temperature`. With `config.learnable_temperature` it is learned
    CLIP-style: the parameter `logit_scale` stores log(1/tau) and is clamped when used so that 1/tau <= 100. Without
    it the head has no parameters at all and tau is a plain float (nothing in the state dict).

    Under `torch.distributed` the in-batch negatives are those of the global batch (see `symmetric_info_nce`), so
    a per-device batch of 1 still trains L_sym when several processes run.

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
        text_rows: torch.BoolTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """
        Args:
            latents: latent tokens Z `[batch, Lz, D]` (all K steps concatenated), `latent_mask` `[batch, Lz]` or None.
            text_hidden: LLM hidden states of the explicit rationale T `[batch, Lt, D]`, `text_mask` `[batch, Lt]`;
                `text_hidden=None` skips the text term (then `z_t` is None and `total = z_v`).
            visual: window visual features V `[batch, Lv, D]`, `visual_mask` `[batch, Lv]` or None.
            text_rows: `[batch]` bool, the rows of `latents` that `text_hidden` belongs to (rows without a rationale
                have none); None: every row. The latents are pooled once for both terms.

        Returns:
            `(total, z_t, z_v)` with `z_t = symmetric_info_nce(pool(Z), pool(T))`,
            `z_v = symmetric_info_nce(pool(Z), pool(V))` and `total = z_t + z_v` (float32 scalars).
        """
        tau = self.temperature
        pooled_latents = mean_max_pool(latents, latent_mask)
        z_v = symmetric_info_nce(pooled_latents, mean_max_pool(visual, visual_mask), tau)
        if text_hidden is None:
            return z_v, None, z_v
        text_latents = pooled_latents if text_rows is None else pooled_latents[text_rows]
        z_t = symmetric_info_nce(text_latents, mean_max_pool(text_hidden, text_mask), tau)
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
    "gather_rows",
    "info_nce",
    "mean_max_pool",
    "symmetric_info_nce",
    "text_prefix_loss",
]
