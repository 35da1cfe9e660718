"""The record of a latent refocusing run (Eq. 1-5) and its adaptive halting (Table 4).

`LaReModel.latent_refocus` runs the loop; what each step k chose and produced is a `LatentStep` in the run's
`LatentTrace`, and `LatentHalting` decides which samples stop early and keeps the attention mask and positions the
language-model calls use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .refocus import latent_steps_converged


@dataclass
class LatentStep:
    """Latent step k of every sample: Z^(k) `[batch, m, D]`, the saliency over the image tokens that chose the
    window `[batch, grid*grid]`, the window's top-left patch `[batch, 2]`, V_s `[batch, window tokens, D]` and the
    Extractor's last cross-attention (or None)."""

    latents: torch.Tensor
    saliency: torch.Tensor
    window_position: torch.LongTensor
    window_features: torch.Tensor
    extractor_attention: torch.Tensor | None


@dataclass
class LatentTrace:
    """The steps of one run. `rows`: the rows that run the latent phase (None: every row); a text-only row keeps
    its own token embeddings in the latent columns, zero saliency and a window at (0, 0)."""

    rows: torch.BoolTensor | None
    steps: list[LatentStep] = field(default_factory=list)

    def history(self) -> torch.Tensor | None:
        """Z^(<k), the earlier latents `[batch, (k-1)*m, D]` (None before the first step)."""
        return torch.cat([step.latents for step in self.steps], dim=1) if self.steps else None

    @property
    def latents(self) -> torch.Tensor:
        """Z^(k) of the last recorded step."""
        return self.steps[-1].latents

    def record(self, step: LatentStep, slot_embeds: torch.Tensor) -> None:
        """Append `step` (latents cast to the sequence's dtype); text-only rows keep `slot_embeds`, their tokens in
        the step's columns."""
        step.latents = step.latents.to(slot_embeds.dtype)
        if self.rows is not None:
            step.latents = torch.where(self.rows[:, None, None], step.latents, slot_embeds)
            step.saliency = step.saliency * self.rows[:, None]
            step.window_position = step.window_position * self.rows[:, None]
        self.steps.append(step)

    def output_fields(self, grid: int, with_extractor_attention: bool) -> dict[str, torch.Tensor | None]:
        """The per-step fields of `LaReModelOutputWithPast`, stacked over the steps."""
        batch = self.latents.shape[0]
        return {
            "latent_embeds": torch.stack([step.latents for step in self.steps], dim=1),
            "saliency_maps": torch.stack([step.saliency for step in self.steps], dim=1).view(
                batch, len(self.steps), grid, grid
            ),
            "window_positions": torch.stack([step.window_position for step in self.steps], dim=1),
            "window_features": torch.stack([step.window_features for step in self.steps], dim=1),
            "extractor_attentions": torch.stack([step.extractor_attention for step in self.steps], dim=1)
            if with_extractor_attention
            else None,
        }


class LatentHalting:
    """Adaptive halting (Table 4; `criterion` = "cosine" | "l1" | "l2" with `threshold`, or None: every sample
    runs all K steps) and the number of steps each sample used (0 for a text-only row).

    After each step k >= 2 a running sample whose Z^(k) has converged to Z^(k-1) (`latent_steps_converged`) stops;
    Z^(k) is its last step. Its later slots are masked out of `attention_mask` and the positions after them shift
    down by their number, so the sample continues exactly as a run with K = k slots would. The caller's tensors are
    copied before the first change."""

    def __init__(
        self,
        criterion: str | None,
        threshold: float | None,
        rows: torch.BoolTensor | None,
        num_steps: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        slots: tuple[int, int, int],
        batch: int,
        device: torch.device,
    ):
        self.criterion, self.threshold = criterion, threshold
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.slots_start, self.slots_end, self.tokens_per_step = slots
        # text-only rows neither halt (their columns hold prompt tokens) nor count latent steps
        self.running = torch.ones(batch, dtype=torch.bool, device=device) if rows is None else rows.clone()
        self.steps_used = torch.full((batch,), num_steps, dtype=torch.long, device=device)
        self.steps_used[~self.running] = 0
        self.halted_any = False

    def update(self, step: int, trace: LatentTrace) -> bool:
        """After step `step` (0-based) of `trace`: halt the samples that converged; True when none runs on."""
        if self.criterion is None or step < 1:
            return False
        current, previous = trace.steps[-1].latents, trace.steps[-2].latents
        halts = self.running & latent_steps_converged(current, previous, self.criterion, self.threshold)
        if halts.any():
            if not self.halted_any:  # the caller's tensors are left as they were
                batch, length = self.attention_mask.shape
                self.position_ids = self.position_ids.expand(*self.position_ids.shape[:-2], batch, length).clone()
                self.attention_mask, self.halted_any = self.attention_mask.clone(), True
            self.steps_used[halts] = step + 1
            self.running &= ~halts
            unused_start = self.slots_start + (step + 1) * self.tokens_per_step
            mask_unused_slots(self.attention_mask, self.position_ids, halts, unused_start, self.slots_end)
        return not self.running.any()

    def output_fields(self) -> dict[str, torch.Tensor]:
        """`latent_steps`, and with halting the mask and positions the sequence ran with (decoding continues with
        them)."""
        fields = {"latent_steps": self.steps_used}
        if self.criterion is not None:
            fields.update(halted_attention_mask=self.attention_mask, halted_position_ids=self.position_ids)
        return fields


def mask_unused_slots(
    attention_mask: torch.Tensor,
    position_ids: torch.LongTensor,
    halts: torch.BoolTensor,
    unused_start: int,
    slots_end: int,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """Adaptive halting, in place: mask the slots [unused_start, slots_end) of the halted rows out of attention and
    shift the positions after them down by the number of slots that were still attended, so the rest of the
    sequence sits where a run with fewer slots puts it (a slot already masked, e.g. when the caller passes back this
    mask, shifts nothing twice)."""
    removed = attention_mask[:, unused_start:slots_end].long().sum(-1) * halts.long()
    attention_mask[halts, unused_start:slots_end] = 0
    position_ids[..., slots_end:] -= removed.view(*([1] * (position_ids.dim() - 2)), -1, 1).to(position_ids.dtype)
    return attention_mask, position_ids


__all__ = ["LatentHalting", "LatentStep", "LatentTrace", "mask_unused_slots"]
