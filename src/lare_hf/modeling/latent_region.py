"""The latent region of a prompt: `<|latent_start|> K*m x <|latent|> <|latent_end|>` (Sec. 3.1, "Inference Phase").

The processor writes K*m `<|latent|>` slots between the two markers; the latent loop (Eq. 1-5) fills them with
Z^(1..K). `find_latent_regions` parses a batch once; `latent_layout` checks that the region can be run (aligned
columns, K*m slots, an image per row that carries one) and `rewrite_latent_steps` rewrites it to another K. Given
`inputs_embeds` instead of ids, `placeholder_ids_from_embeds` recovers the placeholder ids they are parsed from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration_lare import LaReConfig


@dataclass
class LatentLayout:
    """Where the latent region sits in a batch: `<|latent_start|>` and `<|latent_end|>` columns, number of steps K,
    and the rows that carry it (`rows`: those with an image; the latent phase refocuses on the image, so a
    text-only row has no region and runs as with K=0)."""

    start: int | None
    num_steps: int
    end: int | None = None
    rows: torch.BoolTensor | None = None


@dataclass
class LatentRegions:
    """The latent markers of each row of a batch, as found in `input_ids` (`[batch, length]` masks, `[batch]` rows
    and columns; a column is 0 where its marker is absent)."""

    starts: torch.BoolTensor
    ends: torch.BoolTensor
    slots: torch.BoolTensor
    with_region: torch.BoolTensor
    with_image: torch.BoolTensor
    start_columns: torch.LongTensor
    end_columns: torch.LongTensor


def find_latent_regions(input_ids: torch.LongTensor, config: LaReConfig) -> LatentRegions:
    """Locate `<|latent_start|>`, `<|latent|>`, `<|latent_end|>` and `<|image|>` in every row."""
    starts = input_ids == config.latent_start_token_id
    ends = input_ids == config.latent_end_token_id
    return LatentRegions(
        starts=starts,
        ends=ends,
        slots=input_ids == config.latent_token_id,
        with_region=starts.any(dim=1),
        with_image=(input_ids == config.image_token_id).any(dim=1),
        start_columns=starts.int().argmax(dim=1),
        end_columns=ends.int().argmax(dim=1),
    )


def placeholder_ids_from_embeds(
    inputs_embeds: torch.Tensor, embedding: torch.nn.Module, config: LaReConfig
) -> torch.LongTensor:
    """Token ids of the `<|image|>` and latent-region placeholders in `inputs_embeds`, found by comparing each
    position with their token embeddings (as transformers' VLMs find image tokens); -1 elsewhere. Embeddings
    whose latent slots are already filled (no `<|latent|>` embedding left) have no latent region to run."""

    def positions_of(token_id: int) -> torch.Tensor:
        token = embedding(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
        return (inputs_embeds == token).all(-1)

    placeholder_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
    placeholder_ids[positions_of(config.image_token_id)] = config.image_token_id
    slots = positions_of(config.latent_token_id)
    if slots.any():
        placeholder_ids[slots] = config.latent_token_id
        placeholder_ids[positions_of(config.latent_start_token_id)] = config.latent_start_token_id
        placeholder_ids[positions_of(config.latent_end_token_id)] = config.latent_end_token_id
    return placeholder_ids


def latent_layout(input_ids: torch.LongTensor, config: LaReConfig) -> LatentLayout:
    """Find the latent region and check it is aligned.

    The latent phase refocuses on the image, so the rows with an image carry the region (`LatentLayout.rows`)
    and text-only rows carry none: they are plain prompts (as with K=0), left-padded like the others, whose
    tokens in the region's columns go through the loop unchanged."""
    regions = find_latent_regions(input_ids, config)
    starts, ends, slots, rows = regions.starts, regions.ends, regions.slots, regions.with_region
    if not rows.any():
        if ends.any() or slots.any():
            raise ValueError(
                "The input has <|latent|> or <|latent_end|> tokens but no <|latent_start|>. Build prompts with "
                "LaReProcessor so the latent region is `<|latent_start|> <|latent|>... <|latent_end|>`."
            )
        return LatentLayout(start=None, num_steps=0)
    _check_region_rows(rows, regions.with_image)
    if (starts.sum(dim=1)[rows] != 1).any() or (ends.sum(dim=1)[rows] != 1).any():
        raise ValueError("Each sequence must contain exactly one <|latent_start|> and one <|latent_end|>.")
    if (ends.any(dim=1) & ~rows).any() or (slots.any(dim=1) & ~rows).any():
        raise ValueError("<|latent|> or <|latent_end|> tokens appear in a row without <|latent_start|>.")
    start_columns, end_columns = regions.start_columns[rows], regions.end_columns[rows]
    if (start_columns != start_columns[0]).any() or (end_columns != end_columns[0]).any():
        raise ValueError(
            f"The latent regions are not aligned across the batch (<|latent_start|> at columns "
            f"{start_columns.tolist()}, <|latent_end|> at {end_columns.tolist()}). Left-pad the prompts "
            "(tokenizer.padding_side='left', as LaReProcessor does) so the latent slots share columns."
        )
    start, end = int(start_columns[0]), int(end_columns[0])
    num_slots = end - start - 1
    m = config.latent_tokens_per_step
    foreign = (~slots[:, start + 1 : end]) & rows[:, None]
    if foreign.any():
        row, offset = (int(index) for index in foreign.nonzero()[0])
        column = start + 1 + offset
        raise ValueError(
            f"Token id {int(input_ids[row, column])} at row {row}, column {column} sits inside the latent region "
            f"(columns {start + 1}-{end - 1}), which holds only <|latent|> slots (id {config.latent_token_id}). "
            "Build prompts with LaReProcessor / its chat template, and keep user text out of the region."
        )
    if num_slots <= 0 or num_slots % m != 0 or not slots[rows, start + 1 : end].all():
        raise ValueError(
            f"The latent region must hold K x {m} <|latent|> slots (m = latent_tokens_per_step) between "
            f"<|latent_start|> and <|latent_end|>; found {num_slots} positions."
        )
    if int(slots.sum()) != num_slots * int(rows.sum()):
        raise ValueError("<|latent|> tokens appear outside the latent region.")
    num_steps = num_slots // m
    if num_steps > config.max_latent_steps:
        raise ValueError(
            f"The prompt asks for K={num_steps} latent steps but this model allows at most "
            f"max_latent_steps={config.max_latent_steps}."
        )
    return LatentLayout(start=start, num_steps=num_steps, end=end, rows=rows)


def _check_region_rows(rows: torch.BoolTensor, with_image: torch.BoolTensor) -> None:
    """In a batch with a latent region, exactly the rows with an image carry one."""
    if (with_image & ~rows).any():
        missing = (with_image & ~rows).nonzero().flatten().tolist()
        raise ValueError(
            f"Rows {missing} of the batch have an image but no latent region while others have one; every "
            "prompt with an image in a batch must be built with the same number of latent steps."
        )
    if (rows & ~with_image).any():
        text_only = (rows & ~with_image).nonzero().flatten().tolist()
        raise ValueError(
            f"Rows {text_only} have a latent region but no image: the latent phase refocuses on the image, so a "
            "text-only prompt carries no region (LaRe's chat template writes none without an image, and "
            "generate() removes it). Render those prompts with num_latent_steps=0."
        )


def check_num_latent_steps(num_latent_steps: int | None, config: LaReConfig) -> None:
    """`num_latent_steps` is None (keep the prompt's K) or an integer in [0, max_latent_steps]."""
    if num_latent_steps is None:
        return
    if isinstance(num_latent_steps, bool) or not isinstance(num_latent_steps, int):
        raise ValueError(
            f"num_latent_steps must be an integer between 0 and max_latent_steps={config.max_latent_steps}, "
            f"got {num_latent_steps!r} ({type(num_latent_steps).__name__})."
        )
    if num_latent_steps < 0 or num_latent_steps > config.max_latent_steps:
        raise ValueError(
            f"num_latent_steps must be between 0 and max_latent_steps={config.max_latent_steps}, "
            f"got {num_latent_steps}."
        )


def halting_latent_steps(num_latent_steps: int | None, latent_halting: str | None, config: LaReConfig) -> int | None:
    """The K a prompt's latent region is rewritten to: `num_latent_steps`, or with adaptive halting and no K asked
    for, the cap `max_latent_steps` (Table 4: the adaptive rows run past the fixed K, up to a maximum, and stop when
    the latents converge), so a sample may take more steps than the prompt's K."""
    if latent_halting is not None and num_latent_steps is None:
        return config.max_latent_steps
    return num_latent_steps


def rewrite_latent_steps(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    num_latent_steps: int | None,
    config: LaReConfig,
    pad_token_id: int,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Rewrite the latent region of each prompt with an image to `num_latent_steps` x m slots (K=0 removes it;
    None keeps its K) and remove any region from text-only prompts (the latent phase needs an image); rows
    whose length changed are left-padded again with `pad_token_id` so the regions share columns. Unchanged tensors
    come back when nothing is rewritten."""
    check_num_latent_steps(num_latent_steps, config)
    regions = find_latent_regions(input_ids, config)
    with_region, with_image = regions.with_region, regions.with_image
    if num_latent_steps and (with_image & ~with_region).any():
        raise ValueError(
            f"num_latent_steps={num_latent_steps} was asked for but the prompt has no latent markers. Build it "
            "with LaReProcessor / apply_chat_template(add_generation_prompt=True), which ends the prompt with "
            "`<|latent_start|><|latent|>...<|latent_end|>`."
        )
    start_columns, end_columns = regions.start_columns, regions.end_columns
    malformed = (regions.starts.sum(dim=1) != 1) | (regions.ends.sum(dim=1) != 1) | (end_columns <= start_columns)
    if (malformed & with_region).any():
        raise ValueError(
            "Each sequence must contain exactly one <|latent_start|> and one <|latent_end|> after it; build "
            "prompts with LaReProcessor / apply_chat_template(add_generation_prompt=True)."
        )
    m = config.latent_tokens_per_step
    region_steps = (end_columns - start_columns - 1) // m
    target = region_steps if num_latent_steps is None else torch.full_like(region_steps, num_latent_steps)
    target = torch.where(with_image, target, 0)
    rewrite = with_region & (~with_image | (region_steps != target))
    if not rewrite.any():
        return input_ids, attention_mask
    rows_ids, rows_mask = [], []
    for row in range(input_ids.shape[0]):
        ids, mask = input_ids[row], attention_mask[row]
        if rewrite[row]:
            start, end, steps = int(start_columns[row]), int(end_columns[row]), int(target[row])
            region = ids.new_tensor(
                [config.latent_start_token_id] + [config.latent_token_id] * steps * m + [config.latent_end_token_id]
                if steps
                else []
            )
            ids = torch.cat([ids[:start], region, ids[end + 1 :]])
            mask = torch.cat([mask[:start], mask.new_ones(region.shape), mask[end + 1 :]])
        first = int(mask.nonzero()[0]) if mask.any() else mask.shape[0]
        rows_ids.append(ids[first:])
        rows_mask.append(mask[first:])
    return _left_pad(rows_ids, rows_mask, input_ids, attention_mask, pad_token_id)


def _left_pad(
    rows_ids: list[torch.LongTensor],
    rows_mask: list[torch.Tensor],
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    pad_token_id: int,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Stack rows of different lengths, left-padded (ids `pad_token_id`, mask 0)."""
    length = max(ids.shape[0] for ids in rows_ids)
    new_ids = input_ids.new_full((len(rows_ids), length), pad_token_id)
    new_mask = attention_mask.new_zeros((len(rows_ids), length))
    for row, (ids, mask) in enumerate(zip(rows_ids, rows_mask)):
        new_ids[row, length - ids.shape[0] :] = ids
        new_mask[row, length - mask.shape[0] :] = mask
    return new_ids, new_mask


__all__ = [
    "LatentLayout",
    "LatentRegions",
    "check_num_latent_steps",
    "find_latent_regions",
    "halting_latent_steps",
    "latent_layout",
    "placeholder_ids_from_embeds",
    "rewrite_latent_steps",
]
