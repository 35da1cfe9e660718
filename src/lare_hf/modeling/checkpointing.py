"""Cache-aware gradient checkpointing for LaRe's latent loop (not in the paper: a memory option of training).

The latent loop (Eq. 1-2) feeds one sequence in K+1 language-model calls on top of a `DynamicCache`; this wrapper
lets transformers' layer-wise gradient checkpointing keep that cache (see `checkpoint_through_cache`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer


def _decoder_layer_index(layer: nn.Module) -> int:
    """Index of a decoder layer in its model (transformers decoders keep it on their attention module)."""
    for module in (layer, getattr(layer, "self_attn", None)):
        index = getattr(module, "layer_idx", None)
        if index is not None:
            return index
    raise ValueError(
        f"Gradient checkpointing through LaRe's latent loop needs the decoder layer's index, but "
        f"{type(layer).__name__} has no `layer_idx` (nor `self_attn.layer_idx`)."
    )


def checkpoint_through_cache(checkpoint_function: Callable) -> Callable:
    """Wrap a gradient-checkpointing function (`torch.utils.checkpoint.checkpoint` with its kwargs, as
    `gradient_checkpointing_enable` builds it) so that a decoder layer checkpoints together with its KV cache.

    The latent loop (Eq. 1-2) feeds one sequence in several language-model calls on top of a `DynamicCache`, so the
    keys / values a layer writes in one call are attended to, and receive gradient, in the later ones. transformers
    drops the cache inside checkpointed layers (a replay during backward would append to it a second time). Here the
    layer's cached keys / values before the call go in as explicit inputs of the checkpointed function and the
    updated ones come out as its outputs: the replay restores the cache entry it started from, so it recomputes
    exactly the forward's values, and gradient reaches earlier calls through the cache with reentrant and
    non-reentrant checkpointing alike. Calls without a cache (or without gradient) are left to `checkpoint_function`.
    """

    def checkpoint_layer(function: Callable, *args):
        # GradientCheckpointingLayer hands over `partial(forward, layer, **kwargs)`; anything else (a wrapper that
        # counts calls, say) is checkpointed as it is
        keywords = function.keywords if isinstance(function, functools.partial) else {}
        cache_name = "past_key_values" if "past_key_values" in keywords else "cache"
        cache = keywords.get(cache_name)
        if cache is None or not torch.is_grad_enabled():
            return checkpoint_function(function, *args) if torch.is_grad_enabled() else function(*args)
        layer_index = _decoder_layer_index(function.args[0])
        if not isinstance(cache, DynamicCache) or type(cache.layers[layer_index]) is not DynamicLayer:
            raise ValueError(
                f"Gradient checkpointing through the latent loop needs a DynamicCache with full-attention layers, "
                f"got {type(cache).__name__} (layer {layer_index}: {type(cache.layers[layer_index]).__name__}). "
                "Train without passing past_key_values, or disable gradient checkpointing."
            )
        cache_layer = cache.layers[layer_index]
        past_keys = cache_layer.keys if cache_layer.is_initialized else None
        past_values = cache_layer.values if cache_layer.is_initialized else None

        def layer_with_cache(hidden_states, keys, values, *other_args):
            cache_layer.keys, cache_layer.values, cache_layer.is_initialized = keys, values, keys is not None
            output = function(hidden_states, *other_args)
            return output, cache_layer.keys, cache_layer.values

        output, keys, values = checkpoint_function(layer_with_cache, args[0], past_keys, past_values, *args[1:])
        cache_layer.keys, cache_layer.values = keys, values
        return output

    return checkpoint_layer


__all__ = ["checkpoint_through_cache"]
