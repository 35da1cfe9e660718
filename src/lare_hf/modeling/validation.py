"""Small checks for user input at LaRe's boundaries (config, model calls, command line).

Every helper raises `ValueError` with a message that names the argument, the value it got and how to fix it. This
module imports only the standard library, torch, transformers' logging and `cache_naming`: it travels with the
model's custom code.
The checks of a model call (`check_model_inputs`, `check_training_inputs`, `check_continuation`,
`check_generation_inputs`) run before anything is computed. Those that read tensor values (`check_token_ids`,
`check_continuation`) are skipped while `torch.compile` traces a call (`values_checkable`): a value read there would
split the graph, and the compiled call is `generate()`'s decode step, whose tokens `generate()` itself chose.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import torch
from transformers.utils import logging

from .cache_naming import given_cache

logger = logging.get_logger(__name__)

# Decoding modes whose draft tokens would be verified against a cache that holds latent embeddings the draft
# model never saw: they cannot give the right text, so generate() refuses them.
UNSUPPORTED_GENERATION_KWARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


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


def values_checkable() -> bool:
    """Whether checks that read tensor values run: always in eager mode; not while `torch.compile` traces the call
    (a value read there is a data-dependent branch that breaks the graph). The compiled call is the decode step of
    `generate()` with a static cache, which feeds the tokens `generate()` itself chose."""
    return not torch.compiler.is_compiling()


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, ignore_index: int | None = None) -> None:
    """Ids within [0, vocab_size) (or equal to `ignore_index`), so that embedding / loss lookups do not fail deep
    inside torch. Skipped inside a compiled call (`values_checkable`)."""
    if not values_checkable():
        return
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


def check_model_inputs(
    config,
    vocab_size: int,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    pixel_values: torch.Tensor | None,
    past_length: int | None = 0,
) -> None:
    """Types, shapes and ranges of the tensors given to a LaRe `forward()` (`config`: its `LaReConfig`,
    `vocab_size`: the rows of its input embeddings), checked against `input_ids` (or `inputs_embeds`) before
    anything runs, each error naming the argument, its value and the fix. `past_length`: the positions the cache
    holds, None when a compiled call cannot read them (`cache_naming.cached_length`; the checks that need them are
    then skipped)."""
    if input_ids is not None:
        check_tensor("input_ids", input_ids, dims=2, integer=True)
        check_token_ids("input_ids", input_ids, vocab_size)
        batch, length = input_ids.shape
    else:
        check_tensor("inputs_embeds", inputs_embeds, dims=3, integer=False)
        batch, length = inputs_embeds.shape[:2]
    if isinstance(attention_mask, torch.Tensor):  # generate() with a static cache passes prebuilt mask dicts
        check_tensor("attention_mask", attention_mask, dims=(2, 4))
        expected = (batch, (past_length or 0) + length)
        if past_length is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) != expected:
            cached = f" on top of {past_length} cached positions" if past_length else ""
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the input has {batch} row(s) of "
                f"{length} tokens{cached}: it must have shape {expected}, one entry per position (1 = token, "
                "0 = padding). Pass the attention_mask the processor returned with these input_ids."
            )
    if position_ids is not None:
        check_tensor("position_ids", position_ids, dims=(2, 3), integer=True)
        if position_ids.shape[-1] != length or position_ids.shape[-2] not in (1, batch):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)} but the input has {batch} row(s) of {length} "
                f"tokens: it must have shape ({batch}, {length}) (or leave it None to count positions from the "
                "attention_mask)."
            )
    if past_length != 0:
        return
    if pixel_values is not None:
        check_pixel_values(pixel_values, config.vision_config.image_size)
    warn_past_max_positions(config, length)


def warn_past_max_positions(config, length: int) -> None:
    """RoPE still computes positions past `max_position_embeddings` (and RoPE-scaling configs run there on purpose),
    so, as transformers' decoders do, a longer sequence runs; the quality past the trained context is the caller's
    call, said once."""
    text_config = config.get_text_config()
    max_positions = getattr(text_config, "max_position_embeddings", None)
    rope = getattr(text_config, "rope_parameters", None) or {}
    if max_positions and length > max_positions and rope.get("rope_type", "default") == "default":
        logger.warning_once(
            f"The sequence has {length} positions (text, {config.image_seq_length} per image, and the "
            f"latent slots) but the language model was trained for at most max_position_embeddings="
            f"{max_positions}: positions past it are extrapolated. Shorten the prompt, use fewer latent steps "
            "(num_latent_steps), or a language model with a longer context (or RoPE scaling)."
        )


def check_training_inputs(
    vocab_size: int,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.Tensor | None,
    labels: torch.LongTensor | None,
    rationale_input_ids: torch.LongTensor | None,
    rationale_attention_mask: torch.Tensor | None,
) -> None:
    """`labels` and the rationale checked against the input sequence before the forward runs."""
    sequence = input_ids if input_ids is not None else inputs_embeds
    batch = sequence.shape[0] if sequence is not None else None
    if labels is not None:
        check_tensor("labels", labels, dims=2, integer=True)
        if sequence is not None and tuple(labels.shape) != tuple(sequence.shape[:2]):
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but the input sequence has shape "
                f"{tuple(sequence.shape[:2])}; give one label per input position (-100 where no loss is taken), "
                "as LaReProcessor.build_training_inputs / LaReDataCollator write them."
            )
        check_token_ids("labels", labels, vocab_size, ignore_index=-100)
    if rationale_input_ids is not None:
        check_tensor("rationale_input_ids", rationale_input_ids, dims=2, integer=True)
        check_token_ids("rationale_input_ids", rationale_input_ids, vocab_size)
        if batch is not None and rationale_input_ids.shape[0] != batch:
            raise ValueError(
                f"rationale_input_ids has {rationale_input_ids.shape[0]} rows but the batch has {batch} samples; "
                "give one rationale per sample (in the same order)."
            )
    if rationale_attention_mask is not None:
        if rationale_input_ids is None:
            raise ValueError("rationale_attention_mask was given without rationale_input_ids; pass both.")
        check_tensor("rationale_attention_mask", rationale_attention_mask, dims=2)
        if rationale_attention_mask.shape != rationale_input_ids.shape:
            raise ValueError(
                f"rationale_attention_mask has shape {tuple(rationale_attention_mask.shape)} but "
                f"rationale_input_ids has shape {tuple(rationale_input_ids.shape)}; they must match."
            )


def check_halting_not_in_training(
    latent_halting: str | None,
    labels: torch.LongTensor | None,
    rationale_input_ids: torch.LongTensor | None,
    compute_latent_losses: bool | None,
) -> None:
    """Adaptive halting is an inference option: a training forward runs every sample through all K steps."""
    if latent_halting is not None and (labels is not None or rationale_input_ids is not None or compute_latent_losses):
        raise ValueError(
            f"latent_halting={latent_halting!r} is an inference option (generate() or a forward without labels): "
            "training runs every sample through all K latent steps. Drop latent_halting, or labels / rationale."
        )


def check_halting_mask(latent_halting: str | None, attention_mask: Any) -> None:
    """Adaptive halting masks each halted sample's unused latent slots: it needs a 2D attention mask."""
    if latent_halting is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        raise ValueError(
            "Adaptive halting (latent_halting) masks each halted sample's unused latent slots in a 2D "
            f"attention_mask [batch, length], got {type(attention_mask).__name__}. Pass the processor's 2D mask "
            "(and no static cache)."
        )


def placeholder_token_ids(config) -> tuple[int, int, int]:
    """The ids that only a sequence's first pass encodes: `<|image|>`, `<|latent_start|>`, `<|latent|>`."""
    return (config.image_token_id, config.latent_start_token_id, config.latent_token_id)


def check_continuation(config, placeholder_ids: torch.LongTensor) -> None:
    """Positions fed on top of a filled cache are plain text: images and latent slots are encoded with the
    sequence's first pass (their pixel_values are then already in the cache and are not needed). Skipped inside a
    compiled call (`values_checkable`)."""
    if not values_checkable():
        return
    found = [token_id for token_id in placeholder_token_ids(config) if (placeholder_ids == token_id).any()]
    if found:
        raise ValueError(
            f"The positions fed on top of past_key_values contain image or latent placeholders (ids {found}); "
            "those are only encoded in a sequence's first pass. Pass the whole sequence without past_key_values."
        )


def warn_placeholders_without_pixels(config, placeholder_ids: torch.LongTensor) -> None:
    """Without pixel_values the input is read as text, as transformers' VLMs read it (LLaVA embeds its image
    token like any other): `<|image|>` and latent placeholders go through the language model as ordinary
    tokens and no latent phase runs. Said once, since a forgotten `pixel_values` is the usual cause."""
    if any(bool((placeholder_ids == token_id).any()) for token_id in placeholder_token_ids(config)):
        logger.warning_once(
            "The input holds <|image|> or latent placeholders but no pixel_values: it is read as text (the "
            "placeholders embed as ordinary tokens) and no latent refocusing runs. Pass the processor's "
            "pixel_values to see the image and run the latent phase."
        )


def check_generation_inputs(
    input_ids: torch.LongTensor | None,
    num_latent_steps: int | None,
    latent_halting: str | None,
    generate_kwargs: dict[str, Any],
) -> None:
    """What a LaRe `generate()` refuses before GenerationMixin runs: assisted / prompt-lookup decoding, and
    `num_latent_steps` / `latent_halting` where the prompt's latent phase cannot run (no `input_ids` to rewrite, a
    cache that already holds the prompt, a static cache)."""
    for name in ("max_new_tokens", "min_new_tokens", "max_length", "min_length"):
        value = generate_kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            # GenerationMixin only checks the sign: max_new_tokens=0.5 would generate one token.
            raise ValueError(
                f"{name} must be an integer, got {value!r} ({type(value).__name__}); pass e.g. {name}=32."
            )
    past_key_values = given_cache(generate_kwargs)
    if latent_halting is not None:
        if past_key_values is not None:
            raise ValueError(
                "latent_halting cannot be combined with past_key_values: the latent phase is run by the prefill of a "
                "fresh prompt. Drop past_key_values."
            )
        cache_implementation = getattr(generate_kwargs.get("generation_config"), "cache_implementation", None)
        cache_implementation = generate_kwargs.get("cache_implementation", cache_implementation)
        if cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"latent_halting needs the default dynamic cache, got cache_implementation={cache_implementation!r}: "
                "a static cache's prebuilt masks cannot drop the latent slots a sample no longer uses."
            )
    for name in UNSUPPORTED_GENERATION_KWARGS:
        if generate_kwargs.get(name) is not None:
            raise ValueError(
                f"`{name}` (assisted / prompt-lookup decoding) is not supported by LaRe: the draft tokens would "
                "be checked against a cache holding latent embeddings, which gives wrong text."
            )
    generation_config = generate_kwargs.get("generation_config")
    if generation_config is not None and getattr(generation_config, "prompt_lookup_num_tokens", None):
        raise ValueError("Prompt-lookup decoding is not supported by LaRe (latent-filled cache).")
    if num_latent_steps is not None:
        if input_ids is None:
            raise ValueError(
                "num_latent_steps rewrites the latent slots of input_ids, but no input_ids were given. With "
                "inputs_embeds, build the prompt with the wanted K instead (LaReProcessor(num_latent_steps=K))."
            )
        if past_key_values is not None:
            raise ValueError(
                "num_latent_steps cannot be combined with past_key_values: the cache already holds the prompt's "
                "latent region. Continue without num_latent_steps, or drop past_key_values."
            )


__all__ = [
    "FORWARD_KWARGS",
    "UNSUPPORTED_GENERATION_KWARGS",
    "check_bool",
    "check_choice",
    "check_continuation",
    "check_float",
    "check_forward_kwargs",
    "check_generation_inputs",
    "check_halting_mask",
    "check_halting_not_in_training",
    "check_int",
    "check_known_keys",
    "check_model_inputs",
    "check_pixel_values",
    "check_tensor",
    "check_token_ids",
    "check_training_inputs",
    "closest_name",
    "placeholder_token_ids",
    "values_checkable",
    "warn_past_max_positions",
    "warn_placeholders_without_pixels",
]
