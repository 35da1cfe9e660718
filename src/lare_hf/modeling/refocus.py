"""Saliency from the language model's own attention and the sliding window (Sec. 3.1, Eq. 1-2).

The saliency of step k is the attention of the last fed position (`<|latent_start|>` for k=1, the last latent slot
of step k-1 after that) to the image-token keys, averaged over heads and over `saliency_layers`. It is computed
inside the attention call by a function registered with transformers' `AttentionInterface` that wraps the backend the
user chose (eager, sdpa, flash attention, flex attention): the language model keeps its own kernel, and only the
last query row's softmax is computed on the side, so no `output_attentions=True` / eager attention is needed.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

LARE_ATTENTION = "lare_saliency"


class SaliencyRecorder:
    """Collects, for one LM call, the attention of the last query position to the image-token keys.

    Args:
        image_positions: `[batch, num_image_tokens]` column of every image token in the full sequence.
        layers: indices of the LM layers to average over (all layers when None).
        num_layers: number of LM layers (to resolve negative indices).
        track_gradient: record the saliency inside autograd (when it is enabled), for a loss on the saliency
            (`window_loss_weight`); by default it is recorded without a graph, as the argmax window needs none.
    """

    def __init__(
        self,
        image_positions: torch.LongTensor,
        layers: list[int] | None,
        num_layers: int,
        track_gradient: bool = False,
    ):
        self.image_positions = image_positions
        self.track_gradient = track_gradient
        self.layers = None if layers is None else {layer % num_layers for layer in layers}
        self.num_layers = num_layers
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._recorded: set[int] = set()

    def wants(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` is averaged over and has not been recorded yet (a gradient-checkpointing
        replay of the layer during backward runs the attention again; it is not counted twice)."""
        return (self.layers is None or layer_idx in self.layers) and layer_idx not in self._recorded

    def record(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        """Softmax row of the last query over all keys (padding masked), heads averaged, image columns kept
        (inside autograd only with `track_gradient`)."""
        with torch.set_grad_enabled(self.track_gradient and torch.is_grad_enabled()):
            last_query = query[:, :, -1:, :].float()  # [b, heads, 1, d]
            keys = key.float()
            num_heads, num_kv_heads = last_query.shape[1], keys.shape[1]
            if num_heads != num_kv_heads:  # grouped-query attention: share each kv head across its query group
                keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
            scale = scaling if scaling is not None else last_query.shape[-1] ** -0.5
            scores = torch.matmul(last_query, keys.transpose(-1, -2)).squeeze(2) * scale  # [b, heads, kv_len]
            if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):  # flex attention BlockMask
                attention_mask = _block_mask_last_row(attention_mask, query.shape[2], keys.shape[2], query.device)
            if attention_mask is not None:
                row = attention_mask[:, :, -1, : keys.shape[2]]  # [b, 1 or heads, kv_len]
                if row.dtype == torch.bool:
                    scores = scores.masked_fill(~row, torch.finfo(scores.dtype).min)
                else:
                    scores = scores + row.float()
            probs = scores.softmax(dim=-1).mean(dim=1)  # [b, kv_len]
            image_probs = probs.gather(1, self.image_positions)
            self._recorded.add(layer_idx)
            self._sum = image_probs if self._sum is None else self._sum + image_probs
            self._count += 1

    def saliency(self) -> torch.Tensor:
        """`[batch, num_image_tokens]` attention mass averaged over the recorded layers."""
        if self._sum is None:
            raise RuntimeError(
                "No saliency was recorded: the language model did not run the LaRe attention function. "
                "Run it inside `record_saliency(language_model, recorder)`."
            )
        return self._sum / self._count


def _block_mask_last_row(block_mask, query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """The last query row of a flex-attention `BlockMask`, as a boolean `[batch, 1, 1, kv_len]` mask."""
    batch = torch.arange(block_mask.kv_num_blocks.shape[0], device=device)[:, None]
    key_index = torch.arange(key_length, device=device)[None, :]
    query_index = torch.full_like(key_index, query_length - 1)
    row = block_mask.mask_mod(batch, torch.zeros_like(batch), query_index, key_index)
    return row.expand(batch.shape[0], key_length)[:, None, None, :]


def saliency_attention_name(base: str) -> str:
    """The registered attention (and mask) function that records saliency, then runs the `base` backend."""
    name = f"{LARE_ATTENTION}:{base}"
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        if base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise ValueError(
                f"LaRe cannot capture saliency with attn_implementation={base!r}: transformers has no attention mask "
                f"function registered for it. Use one of {sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}."
            )
        AttentionInterface.register(name, _saliency_attention_forward(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _saliency_attention_forward(base: str):
    def attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        saliency_recorder: SaliencyRecorder | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Record the last query row's attention for an active `SaliencyRecorder`, then run `base` on the same
        q/k/v (the backend's own kernel: one extra softmax row per layer, not eager attention everywhere)."""
        if saliency_recorder is not None and saliency_recorder.wants(module.layer_idx):
            saliency_recorder.record(module.layer_idx, query, key, attention_mask, scaling)
        config = module.config
        wrapper_name = config._attn_implementation
        # Backends read the implementation name from the module's config (flash picks its kernel by it).
        config._attn_implementation = base
        try:
            backend = ALL_ATTENTION_FUNCTIONS.get_interface(base, _eager_attention_forward(module))
            return backend(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        finally:
            config._attn_implementation = wrapper_name

    return attention_forward


def _eager_attention_forward(module: torch.nn.Module):
    """The decoder's own eager attention (every transformers decoder defines `eager_attention_forward`)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"{type(module).__name__} has no `eager_attention_forward` in its module; use attn_implementation='sdpa'."
        )
    return function


@contextmanager
def record_saliency(language_model: torch.nn.Module, recorder: SaliencyRecorder | None):
    """Within the block, the language model's attention records saliency for `recorder` on top of the user's
    backend (`config._attn_implementation`: eager, sdpa, flash_attention_*, flex_attention); pass
    `saliency_recorder=recorder` to its forward. A no-op when `recorder` is None."""
    if recorder is None:
        yield
        return
    config = language_model.config
    base = config._attn_implementation or "sdpa"
    config._attn_implementation = saliency_attention_name(base)
    try:
        yield
    finally:
        config._attn_implementation = base


def select_windows(
    saliency: torch.Tensor, grid_size: int, window_size: int, window_stride: int
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Sum-pool the saliency map with a sliding window and pick each sample's best window (Sec. 3.1).

    Args:
        saliency: `[batch, grid_size * grid_size]` attention mass per image token (row-major grid).

    Returns:
        `window_positions` `[batch, 2]` (row, column) of each best window's top-left patch, and
        `token_indices` `[batch, window_size**2]` the indices of the image tokens inside it (row-major).
    """
    batch = saliency.shape[0]
    grid = saliency.view(batch, 1, grid_size, grid_size)
    pooled = F.avg_pool2d(grid, kernel_size=window_size, stride=window_stride) * (window_size * window_size)
    num_cols = pooled.shape[-1]
    best = pooled.flatten(1).argmax(dim=-1)
    rows = (best // num_cols) * window_stride
    cols = (best % num_cols) * window_stride
    offsets = torch.arange(window_size, device=saliency.device)
    token_rows = rows[:, None, None] + offsets[None, :, None]
    token_cols = cols[:, None, None] + offsets[None, None, :]
    token_indices = (token_rows * grid_size + token_cols).flatten(1)
    return torch.stack([rows, cols], dim=-1), token_indices


# How the window V_s is chosen in training (`LaReConfig.window_selection`). "argmax" is the paper's; the others are not
# in the paper: they give the answer's loss a gradient to the saliency that picks the window (`relaxed_window_features`).
WINDOW_SELECTIONS = ("argmax", "straight_through", "gumbel", "soft")


def window_candidates(
    grid_size: int, window_size: int, window_stride: int, device: torch.device
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Every sliding window of the patch grid, in the order of `select_windows`' sum-pooled map (row-major):
    `positions` `[num_windows, 2]` (top-left row, column) and `token_indices` `[num_windows, window_size**2]`."""
    starts = torch.arange(0, grid_size - window_size + 1, window_stride, device=device)
    rows, cols = starts.repeat_interleave(len(starts)), starts.repeat(len(starts))
    offsets = torch.arange(window_size, device=device)
    token_rows = rows[:, None, None] + offsets[None, :, None]
    token_cols = cols[:, None, None] + offsets[None, None, :]
    return torch.stack([rows, cols], dim=-1), (token_rows * grid_size + token_cols).flatten(1)


def relaxed_window_features(
    saliency: torch.Tensor,
    image_features: torch.Tensor,
    grid_size: int,
    window_size: int,
    window_stride: int,
    selection: str,
    temperature: float,
) -> tuple[torch.LongTensor, torch.Tensor, torch.Tensor]:
    """A window choice the loss's gradient reaches (not in the paper; training only, `LaReConfig.window_selection`).

    With s_j the sum-pooled saliency of candidate window j (`window_candidates`), V_j its visual tokens and tau the
    `temperature`, the selection distribution is p = softmax(log s / tau), i.e. p_j ∝ s_j^(1/tau) (at tau = 1, the
    windows' share of the saliency). The saliency must be recorded inside autograd
    (`SaliencyRecorder(track_gradient=True)`) for the gradient to reach the LM's attention that produced it.

    - "straight_through": forward the argmax window V_{j*}, j* = argmax_j s_j (the paper's window, the same values),
      backward the gradient of the expectation: V_s = V_{j*} + E_p[V] - sg(E_p[V]) (sg = stop-gradient).
    - "gumbel": straight-through Gumbel-softmax top-1 (Jang et al. 2017): g_j ~ Gumbel(0, 1),
      y = softmax((log s + g) / tau), forward the sampled window j* = argmax_j (log s_j + g_j), backward through y:
      V_s = V_{j*} + E_y[V] - sg(E_y[V]).
    - "soft": the expectation forward and backward, V_s = E_p[V] = sum_j p_j V_j.

    Returns the window positions `[batch, 2]` (the window forwarded; for "soft" the argmax, the one inference uses
    and L_img crops), V_s `[batch, window tokens, D]` and the weights over the candidates `[batch, num_windows]`."""
    if selection not in WINDOW_SELECTIONS[1:]:
        raise ValueError(f"selection must be one of {WINDOW_SELECTIONS[1:]} for a relaxed window, got {selection!r}.")
    batch = saliency.shape[0]
    grid = saliency.float().view(batch, 1, grid_size, grid_size)
    pooled = F.avg_pool2d(grid, kernel_size=window_size, stride=window_stride).flatten(1) * window_size**2
    logits = pooled.clamp_min(torch.finfo(pooled.dtype).tiny).log()
    chosen = pooled.argmax(dim=-1)  # the paper's window (`select_windows`)
    if selection == "gumbel":
        logits = logits - torch.empty_like(logits).exponential_().log()  # + Gumbel(0, 1) noise
        chosen = logits.argmax(dim=-1)
    weights = (logits / temperature).softmax(dim=-1)
    positions, token_indices = window_candidates(grid_size, window_size, window_stride, saliency.device)
    candidates = image_features[:, token_indices]  # [batch, num_windows, window tokens, D]
    expectation = torch.einsum("bn,bntd->btd", weights.to(candidates.dtype), candidates)
    if selection == "soft":
        return positions[chosen], expectation, weights
    hard = candidates[torch.arange(batch, device=candidates.device), chosen]
    return positions[chosen], hard + (expectation - expectation.detach()), weights


# Adaptive halting (Table 4): how consecutive latent steps Z^(k), Z^(k-1) are compared.
HALTING_CRITERIA = ("cosine", "l1", "l2")


def check_latent_halting(criterion: str | None, threshold: float | None) -> None:
    """`latent_halting` is None or one of `HALTING_CRITERIA`; `latent_halting_threshold` is a finite number (a
    cosine similarity in [-1, 1], or a distance >= 0) given exactly when a criterion is."""
    if criterion is None:
        if threshold is not None:
            raise ValueError(
                f"latent_halting_threshold={threshold!r} was given without latent_halting; pass "
                f"latent_halting='cosine', 'l1' or 'l2' with it, or drop the threshold."
            )
        return
    if criterion not in HALTING_CRITERIA:
        raise ValueError(
            f"latent_halting must be one of {', '.join(map(repr, HALTING_CRITERIA))} (or None for a fixed K), "
            f"got {criterion!r}."
        )
    if threshold is None:
        raise ValueError(
            f"latent_halting={criterion!r} needs latent_halting_threshold: the cosine similarity (>=) or the distance "
            "(<=) between consecutive latent steps at which a sample stops."
        )
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
        raise ValueError(f"latent_halting_threshold must be a number, got {threshold!r} ({type(threshold).__name__}).")
    if criterion == "cosine" and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"latent_halting_threshold is a cosine similarity for 'cosine': in [-1, 1], got {threshold}.")
    if criterion != "cosine" and not 0.0 <= threshold < float("inf"):
        raise ValueError(
            f"latent_halting_threshold is a distance for {criterion!r}: finite and >= 0, got {threshold}."
        )


def latent_step_distance(current: torch.Tensor, previous: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per sample, how far latent step Z^(k) `[batch, m, D]` moved from Z^(k-1) (float32, `[batch]`): the cosine
    similarity of the flattened m x D tokens ("cosine"), or the mean absolute ("l1") / root-mean-square ("l2")
    element of their difference. The distances are per element (our choice; the paper gives no normalisation) so
    that one threshold carries across model widths: latents are normalised to the token embeddings' RMS scale."""
    current, previous = current.flatten(1).float(), previous.flatten(1).float()
    if criterion == "cosine":
        return F.cosine_similarity(current, previous, dim=-1)
    difference = current - previous
    if criterion == "l1":
        return difference.abs().mean(-1)
    if criterion == "l2":
        return difference.pow(2).mean(-1).sqrt()
    raise ValueError(f"criterion must be one of {HALTING_CRITERIA}, got {criterion!r}.")


def latent_steps_converged(
    current: torch.Tensor, previous: torch.Tensor, criterion: str, threshold: float
) -> torch.BoolTensor:
    """`[batch]`: cosine similarity >= threshold, or L1 / L2 distance <= threshold (`latent_step_distance`)."""
    value = latent_step_distance(current, previous, criterion)
    return value >= threshold if criterion == "cosine" else value <= threshold


__all__ = [
    "HALTING_CRITERIA",
    "LARE_ATTENTION",
    "WINDOW_SELECTIONS",
    "SaliencyRecorder",
    "check_latent_halting",
    "latent_step_distance",
    "latent_steps_converged",
    "record_saliency",
    "relaxed_window_features",
    "saliency_attention_name",
    "select_windows",
    "window_candidates",
]
