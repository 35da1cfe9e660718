"""The same module calls on every rank under FSDP / DeepSpeed ZeRO-3 (not in the paper: the paper does not say how
its 8-GPU training is sharded).

FSDP and ZeRO-3 gather a module's parameters from every rank when the module is called, collectively, so every rank
must call the same modules the same number of times on every step. An image batch calls the vision tower, then the
language model K+1 times and the Extractor K times; a batch without any image row makes one language-model pass.
So in sharded training a rank whose whole batch is text-only gets a *phantom image row*: a black image with a latent
region of the K the other ranks use, appended to its batch with no label, no rationale and no window target, and
left out of every loss (its latents are masked like a text-only row's). Its text rows are right-padded to the
phantom's length (padding after a row's last token changes nothing before it, attention being causal), and the
outputs are cut back to the caller's rows and columns. The ranks agree on K with one `all_reduce` per training
step (a rank with image rows of another K than the others is refused on every rank, instead of hanging).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

# The batch entries a phantom row extends, in the order `LaReForConditionalGeneration.forward` unpacks them
PHANTOM_BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "labels",
    "rationale_input_ids",
    "rationale_attention_mask",
    "window_targets",
)
# K reported by a rank without an image row, and the bound the minimum is taken against
NO_IMAGE_ROWS = -1
_NO_MINIMUM = 1 << 30


def agreed_latent_steps(local_steps: int, device: torch.device) -> int:
    """K of the ranks that have image rows (`NO_IMAGE_ROWS` where none has), from one `all_reduce`; raises on every
    rank when two ranks' image rows have different K (their calls would fall out of step)."""
    has_images = local_steps != NO_IMAGE_ROWS
    values = torch.tensor(
        [local_steps, -(local_steps if has_images else _NO_MINIMUM)], dtype=torch.long, device=device
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    largest, smallest = int(values[0]), -int(values[1])
    if largest != NO_IMAGE_ROWS and smallest != largest:
        raise ValueError(
            f"Under FSDP / DeepSpeed ZeRO-3 every rank's image rows must have the same number of latent steps K, but "
            f"the ranks' batches hold K from {smallest} to {largest}; build every per-device batch with the same "
            "num_latent_steps (the processor's)."
        )
    return largest


@dataclass
class PhantomRow:
    """What `add_phantom_image_row` changed: the caller's batch size and sequence length."""

    batch: int
    length: int


def add_phantom_image_row(
    inputs: dict[str, torch.Tensor | None], config, num_latent_steps: int, pad_token_id: int
) -> PhantomRow:
    """Append, in place, a phantom image row to a text-only batch (`inputs`: `input_ids`, `attention_mask`, and where
    given `labels`, `rationale_input_ids`, `rationale_attention_mask`, `window_targets`; `pixel_values` is set to one
    black image): `[left pad][<|image|> x image_seq_length][<|latent_start|> K*m <|latent|> <|latent_end|>]`, the
    text rows right-padded to its length. `num_latent_steps` 0 gives the image tokens alone."""
    input_ids = inputs["input_ids"]
    batch, length = input_ids.shape
    device = input_ids.device
    phantom = [config.image_token_id] * config.image_seq_length
    if num_latent_steps > 0:
        slots = num_latent_steps * config.latent_tokens_per_step
        phantom += [config.latent_start_token_id] + [config.latent_token_id] * slots + [config.latent_end_token_id]
    new_length = max(length, len(phantom))
    phantom_row = torch.full((1, new_length), pad_token_id, dtype=input_ids.dtype, device=device)
    phantom_row[0, new_length - len(phantom) :] = torch.tensor(phantom, dtype=input_ids.dtype, device=device)
    phantom_mask = torch.zeros(1, new_length, dtype=torch.long, device=device)
    phantom_mask[0, new_length - len(phantom) :] = 1

    def extend(tensor: torch.Tensor, fill: int, phantom_values: torch.Tensor | None = None) -> torch.Tensor:
        padded = torch.nn.functional.pad(tensor, (0, new_length - tensor.shape[1]), value=fill)
        if phantom_values is None:
            phantom_values = torch.full_like(padded[:1], fill)
        return torch.cat([padded, phantom_values.to(padded.dtype)], dim=0)

    inputs["input_ids"] = extend(input_ids, pad_token_id, phantom_row)
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs["attention_mask"] = extend(attention_mask, 0, phantom_mask)
    if inputs.get("labels") is not None:
        inputs["labels"] = extend(inputs["labels"], -100)
    for name, fill in (("rationale_input_ids", 0), ("rationale_attention_mask", 0), ("window_targets", -100)):
        if inputs.get(name) is not None:
            inputs[name] = torch.cat([inputs[name], torch.full_like(inputs[name][:1], fill)], dim=0)
    size = config.vision_config.image_size
    dtype = torch.get_default_dtype()
    inputs["pixel_values"] = torch.zeros(1, 3, size, size, dtype=dtype, device=device)
    return PhantomRow(batch=batch, length=length)


def remove_phantom_row(outputs, phantom: PhantomRow):
    """The model output cut back to the caller's rows (and, for the per-position fields, columns)."""
    per_position = {"logits", "hidden_states", "attentions"}
    for field in fields(outputs):
        value = getattr(outputs, field.name)
        if field.name in per_position and value is not None:
            value = cut(value, phantom, columns=True)
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == phantom.batch + 1:
            value = value[: phantom.batch]
        elif field.name == "past_key_values":
            value = None  # holds the phantom row; training does not decode from it
        setattr(outputs, field.name, value)
    return outputs


def cut(value, phantom: PhantomRow, columns: bool):
    if isinstance(value, tuple):
        return tuple(cut(item, phantom, columns) for item in value)
    if value is None:
        return None
    value = value[: phantom.batch]
    if columns and value.dim() == 3:  # [batch, length, ...]
        value = value[:, : phantom.length]
    elif columns and value.dim() == 4:  # attention maps [batch, heads, queries, keys]
        value = value[:, :, : phantom.length, : phantom.length]
    return value


class LaReSynchronisedCallsMixin:
    """`synchronise_module_calls` for `LaReForConditionalGeneration` (which holds `model`, `config`,
    `generation_config` and `_parameters_sharded`)."""

    def synchronise_module_calls(
        self,
        batch: dict[str, torch.Tensor | None],
        inputs_embeds: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
    ) -> PhantomRow | None:
        """In sharded training (FSDP2 / DeepSpeed ZeRO-3): agree with the other ranks on K (one `all_reduce`) and,
        when this rank's batch has no image row while another rank's has, append a phantom image row to `batch` in
        place so that this rank makes the same module calls (see `synchronised_calls`; not in the paper). Returns
        what was appended, or None (always outside sharded training: nothing changes there)."""
        if not self._parameters_sharded():
            return None
        input_ids = batch["input_ids"]
        local_steps = NO_IMAGE_ROWS
        if batch["pixel_values"] is not None:
            placeholder_ids = input_ids if input_ids is not None else self.model.get_placeholder_ids(inputs_embeds)
            local_steps = self.model.latent_layout(placeholder_ids).num_steps
        device = (input_ids if input_ids is not None else inputs_embeds).device
        steps = agreed_latent_steps(local_steps, device)
        if local_steps != NO_IMAGE_ROWS or steps == NO_IMAGE_ROWS:
            return None
        if input_ids is None or position_ids is not None:
            raise ValueError(
                "A text-only batch under FSDP / DeepSpeed ZeRO-3 while other ranks hold images gets a phantom image "
                "row so that every rank makes the same module calls; that needs input_ids and no position_ids "
                "(got inputs_embeds or position_ids). Pass input_ids, as LaReDataCollator does."
            )
        pad = self.generation_config.pad_token_id if self.generation_config is not None else None
        return add_phantom_image_row(batch, self.config, steps, pad if isinstance(pad, int) else 0)


__all__ = [
    "NO_IMAGE_ROWS",
    "PHANTOM_BATCH_KEYS",
    "LaReSynchronisedCallsMixin",
    "PhantomRow",
    "add_phantom_image_row",
    "agreed_latent_steps",
    "remove_phantom_row",
]
