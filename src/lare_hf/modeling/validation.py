"""Small checks for user input at LaRe's boundaries (config, model calls, command line).

Every helper raises `ValueError` with a message that names the argument, the value it got and how to fix it. This
module imports only the standard library and torch: it travels with the model's custom code.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import torch


def closest_name(name: str, valid: Iterable[str]) -> str | None:
    """The valid name closest to `name` (difflib), or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), sorted(valid), n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_known_keys(keys: Iterable[str], valid: Iterable[str], what: str, fix: str = "") -> None:
    """Refuse keys that are not in `valid`, suggesting the closest valid name for each."""
    valid = set(valid)
    unknown = sorted(str(key) for key in keys if key not in valid)
    if not unknown:
        return
    hints = []
    for key in unknown:
        suggestion = closest_name(key, valid)
        hints.append(f"{key!r} (did you mean {suggestion!r}?)" if suggestion else repr(key))
    message = f"Unknown {what} {', '.join(hints)}."
    if len(valid) <= 60 and not any(closest_name(key, valid) for key in unknown):
        message += f" Valid names: {', '.join(sorted(valid))}."
    raise ValueError(message + (f" {fix}" if fix else ""))


def check_int(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    fix: str = "",
) -> None:
    """`value` is an int (not a bool) within [minimum, maximum]; `fix` is appended to the message."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            bound = f"between {minimum} and {maximum}"
        else:
            bound = f">= {minimum}" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name} must be {bound}, got {value}." + (f" {fix}" if fix else ""))


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    fix: str = "",
) -> None:
    """`value` is a finite real number within the bounds (`exclusive_minimum`: strictly above `minimum`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    below = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if below or (maximum is not None and value > maximum):
        low = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise ValueError(
            f"{name} must be {' and '.join(b for b in (low, high) if b)}, got {value}." + (f" {fix}" if fix else "")
        )


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__}).")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """`value` is one of `choices`; an unknown one suggests the closest."""
    choices = list(choices)
    if value in choices:
        return
    suggestion = closest_name(str(value), choices) if isinstance(value, str) else None
    hint = f"did you mean {suggestion!r}? " if suggestion else ""
    raise ValueError(f"{name}={value!r} is not supported; {hint}choose one of {', '.join(map(repr, choices))}.")


def check_tensor(
    name: str, value: Any, dims: int | tuple[int, ...] | None = None, integer: bool | None = None
) -> None:
    """`value` is a torch.Tensor with `dims` dimensions and an integer (`integer=True`) or floating dtype."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}; pass return_tensors='pt'.")
    allowed = (dims,) if isinstance(dims, int) else dims
    if allowed is not None and value.dim() not in allowed:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(value.shape)}."
        )
    if integer is True and (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"{name} must hold integer ids, got dtype {value.dtype}; pass a torch.long tensor.")
    if integer is False and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}.")


def check_same_shape(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(reference.shape):
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but {reference_name} has shape {tuple(reference.shape)}; they "
            "must match (one entry per token)."
        )


def check_batch_size(name: str, value: torch.Tensor, batch_size: int) -> None:
    if value.shape[0] != batch_size:
        raise ValueError(
            f"{name} has batch size {value.shape[0]} but input_ids has {batch_size}; give one row per sample."
        )


def check_pixel_values(pixel_values: Any, image_size: int | None = None) -> None:
    """Pixel values as the processor writes them: float `[N, 3, S, S]`, finite, normalised (not 0-255 bytes)."""
    check_tensor("pixel_values", pixel_values, dims=4)
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values has dtype {pixel_values.dtype}; the model expects normalised float pixels. Pass the "
            "images through the processor (LaReProcessor / apply_chat_template), which rescales and normalises them."
        )
    if image_size is not None and tuple(pixel_values.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"pixel_values has images of {tuple(pixel_values.shape[-2:])} pixels but the vision tower takes "
            f"{image_size}x{image_size}; preprocess them with the model's processor."
        )
    if pixel_values.numel() == 0:
        return
    detached = pixel_values.detach()
    if not torch.isfinite(detached).all():
        raise ValueError("pixel_values contains NaN or infinite values; check the images and their preprocessing.")
    if detached.abs().amax().item() > 20.0:
        raise ValueError(
            f"pixel_values reaches {detached.abs().amax().item():.1f}: these look like raw 0-255 pixels, not "
            "normalised ones. Pass the images through the processor, which rescales and normalises them."
        )


# Keyword arguments a LaRe forward() passes on (to the language model, or to `loss_function`): transformers'
# `TransformersKwargs` (attention-backend and output options) plus the loss's `shift_labels`; and `tokenizer`, which
# `GenerationMixin.generate` (transformers 5.23: `_extract_generation_mode_kwargs`, then
# `decoding_method(**generation_mode_kwargs, **model_kwargs)`) hands on to every model call when one is given for
# `stop_strings` (as `transformers serve` always does); transformers' own models swallow it in `**kwargs`.
FORWARD_KWARGS = frozenset(
    {
        "tokenizer",
        "num_items_in_batch",
        "output_hidden_states",
        "output_attentions",
        "output_router_logits",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "position_ids",
        "is_causal",
        "seq_idx",
        "shift_labels",
    }
)


def check_forward_kwargs(owner: str, kwargs: dict, named: Iterable[str]) -> None:
    """Refuse keyword arguments that `owner` (a forward method) would otherwise swallow into `**kwargs`; `named`
    are its explicit parameters (suggested for typos)."""
    unknown = sorted(set(kwargs) - FORWARD_KWARGS)
    if not unknown:
        return
    name = unknown[0]
    if name == "num_latent_steps":
        raise TypeError(
            f"{owner}() got an unexpected keyword argument 'num_latent_steps': forward() takes K from the number of "
            "<|latent|> slots in input_ids. Use model.generate(..., num_latent_steps=K), "
            "model.set_latent_steps(input_ids, attention_mask, K), or render the prompt with that K "
            "(processor.apply_chat_template(..., num_latent_steps=K))."
        )
    suggestion = closest_name(name, set(named) | FORWARD_KWARGS)
    hint = f"did you mean {suggestion!r}? " if suggestion else ""
    raise TypeError(
        f"{owner}() got an unexpected keyword argument {name!r}; {hint}it takes the model inputs, the output options "
        f"and {', '.join(sorted(FORWARD_KWARGS))}."
    )


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, ignore_index: int | None = None) -> None:
    """Ids within [0, vocab_size) (or equal to `ignore_index`), so that embedding / loss lookups do not fail deep
    inside torch."""
    values = ids if ignore_index is None else ids[ids != ignore_index]
    if values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        ignored = f" (or {ignore_index} to ignore a position)" if ignore_index is not None else ""
        raise ValueError(
            f"{name} holds ids outside the vocabulary: min {low}, max {high}, but ids must be in [0, {vocab_size})"
            f"{ignored}. The tokenizer and the model do not match; after adding tokens call "
            "model.resize_token_embeddings(len(tokenizer))."
        )


__all__ = [
    "FORWARD_KWARGS",
    "check_batch_size",
    "check_bool",
    "check_choice",
    "check_float",
    "check_forward_kwargs",
    "check_int",
    "check_known_keys",
    "check_pixel_values",
    "check_same_shape",
    "check_tensor",
    "check_token_ids",
    "closest_name",
]
