"""The name under which transformers passes the key/value cache between model calls.

transformers 5.24 renamed the `past_key_values` argument of every model's `forward`, of `generate`'s model kwargs
and of the output classes to `cache` (`past_key_values` stays accepted with a FutureWarning until 5.40). LaRe
supports 5.23 through the current release, so it reads the name from the installed transformers instead of
branching on its version: `CACHE_ARGUMENT` is the cache field of `BaseModelOutputWithPast`, the output class every
decoder-only language model returns.

LaRe's own forwards take the cache as `past_key_values` and also accept the new name (`accepts_cache_argument`),
which is what `generate` passes from 5.24 on. `LaReModelOutputWithPast` inherits the cache field of
`BaseModelOutputWithPast` (so it has the installed name); `LaReCausalLMOutputWithPast` declares `past_key_values`.

`cached_length` reads how many positions a cache holds in a way `torch.compile` can trace (a static cache counts
them in a tensor).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

CACHE_ARGUMENT = "cache" if "cache" in {field.name for field in fields(BaseModelOutputWithPast)} else "past_key_values"


def cache_argument(cache: Cache | None) -> dict[str, Cache | None]:
    """`{name: cache}` for a call of the language model (or of `GenerationMixin`) under the installed name."""
    return {CACHE_ARGUMENT: cache}


def output_cache(outputs: Any) -> Cache | None:
    """The cache a transformers model output carries, under the installed name."""
    return getattr(outputs, CACHE_ARGUMENT, None)


def given_cache(kwargs: dict[str, Any]) -> Cache | None:
    """The cache among `generate()` keyword arguments, under either name."""
    cache = kwargs.get("past_key_values")
    return cache if cache is not None else kwargs.get("cache")


def cached_length(cache: Cache | None) -> int | None:
    """The number of positions `cache` holds, as a Python int (0 without a cache). None while `torch.compile` traces
    the call and the cache counts its positions in a tensor (a `StaticCache` in transformers 5.23-5.25): reading that
    tensor would be a data-dependent branch, which splits the compiled graph."""
    if cache is None:
        return 0
    length = cache.get_seq_length()
    if isinstance(length, torch.Tensor):
        return None if torch.compiler.is_compiling() else int(length)
    return length


def accepts_cache_argument(forward: Callable) -> Callable:
    """Let a forward that takes `past_key_values` also take the cache as `cache` (transformers >= 5.24 passes it so
    from `generate`). Both at once is refused."""

    @functools.wraps(forward)
    def forward_with_cache_argument(*args, **kwargs):
        if "cache" in kwargs:
            cache = kwargs.pop("cache")
            if cache is not None and kwargs.get("past_key_values") is not None:
                raise ValueError("Pass the cache once: as `past_key_values` or as `cache`, not both.")
            if cache is not None or "past_key_values" not in kwargs:
                kwargs["past_key_values"] = cache
        return forward(*args, **kwargs)

    return forward_with_cache_argument


__all__ = [
    "CACHE_ARGUMENT",
    "accepts_cache_argument",
    "cache_argument",
    "cached_length",
    "given_cache",
    "output_cache",
]
