"""The training objective of LaRe (Sec. 3.2): the loss terms, their weights and their sum (Eq. 6-8, 10).

`LOSS_TERMS` is the one list of the terms a forward reports: the output fields of `LaReCausalLMOutputWithPast`, the
weighted sum (`weighted_loss`) and the trainer's logging all read it. `LaReLatentLossesMixin` computes the terms on
the latents of a forward of `LaReForConditionalGeneration`:

- L_sym (Eq. 6), symmetric alignment of the pooled latents with the rationale (L_Z<->T) and the window (L_Z<->V),
  computed by the alignment head (`losses.LaReAlignmentHead`);
- L_img (Eq. 7), denoising score matching of the window crops conditioned on Z^(k) (`reconstruction.py`);
- L_text (Eq. 8), the rationale prefix predicted from the latents alone (`losses.text_prefix_loss`);
- the window-grounding loss (not in the paper; `window_loss_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .losses import text_prefix_loss
from .reconstruction import noise_seeds
from .validation import check_tensor

if TYPE_CHECKING:
    from .outputs import LaReModelOutputWithPast


@dataclass(frozen=True)
class LossTerm:
    """One term of the objective: its output field, the `LaReConfig` field of its weight in Eq. 10 (`"1"` for
    L_ntp, which is not weighted; None for a part that is reported but summed through its whole), and what it is."""

    name: str
    weight: str | None
    description: str


LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("lm_loss", "1", "next-token prediction on the answer tokens (L_ntp)"),
    LossTerm("alignment_loss", "sym_loss_weight", "symmetric alignment L_sym = L_Z<->T + L_Z<->V (Eq. 6)"),
    LossTerm("alignment_text_loss", None, "L_Z<->T, the rationale part of L_sym (Eq. 6)"),
    LossTerm("alignment_visual_loss", None, "L_Z<->V, the window part of L_sym (Eq. 6)"),
    LossTerm("image_reconstruction_loss", "image_loss_weight", "denoising score matching of the window crops (Eq. 7)"),
    LossTerm("text_reconstruction_loss", "text_loss_weight", "the rationale prefix from the latents alone (Eq. 8)"),
    LossTerm(
        "window_loss", "window_loss_weight", "window grounding of each latent step's saliency (not in the paper)"
    ),
)
LOSS_TERM_NAMES: tuple[str, ...] = tuple(term.name for term in LOSS_TERMS)


class LaReLatentLossesMixin:
    """The losses of Sec. 3.2 for `LaReForConditionalGeneration` (which holds `model`, `lm_head`, `alignment_head`
    and `reconstructor`)."""

    # Training forwards this model has run (each adds 1 after its losses): the `draw` of L_img's per-sample noise
    # seeds (`reconstruction.noise_seeds`; not in the paper). Every rank runs the same number, so ranks and one
    # process draw alike; `LaReTrainer` sets it from the optimizer step on resume; set it to repeat a draw.
    image_loss_draws: int = 0

    def latent_losses(
        self,
        outputs: LaReModelOutputWithPast,
        pixel_values: torch.Tensor | None,
        rationale_input_ids: torch.LongTensor | None,
        rationale_attention_mask: torch.Tensor | None,
        window_targets: torch.LongTensor | None,
        compute: bool | None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every latent term of this forward that has a non-zero weight (see `forward`'s `compute_latent_losses`).
        `input_ids` / `attention_mask` identify the samples for L_img's noise (`reconstruction.noise_seeds`)."""
        losses = self.semantic_augmentation_losses(
            outputs, pixel_values, rationale_input_ids, rationale_attention_mask, compute, input_ids, attention_mask
        )
        if window_targets is not None and self.config.window_loss_weight > 0 and compute is not False:
            losses["window_loss"] = self.window_grounding_loss(outputs, window_targets)
        return losses

    def weighted_loss(
        self, lm_loss: torch.Tensor | None, latent_losses: dict[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """Eq. 10, L = L_ntp + l_sym L_sym + l_img L_img + l_text L_text, plus the window-grounding loss (not in the
        paper) weighted by `window_loss_weight`, over the terms that were computed (`LOSS_TERMS`)."""
        weights = {term.name: term.weight for term in LOSS_TERMS}
        terms = [] if lm_loss is None else [lm_loss]
        for name, value in latent_losses.items():  # in the order they were computed
            if weights.get(name) is not None:
                terms.append(getattr(self.config, weights[name]) * value)
        return torch.stack(terms).sum() if terms else None

    def semantic_augmentation_losses(
        self,
        outputs: LaReModelOutputWithPast,
        pixel_values: torch.Tensor | None,
        rationale_input_ids: torch.LongTensor | None,
        rationale_attention_mask: torch.Tensor | None,
        compute: bool | None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """L_sym (Eq. 6), L_img (Eq. 7) and L_text (Eq. 8) for the latents of this forward; a term whose weight is
        0 is not computed. L_img draws its noise and timesteps per sample (`reconstruction.noise_seeds` of the
        sample's `input_ids` / `attention_mask` and pixels; not in the paper).

        Each term is taken over the samples that have what it needs, and averaged over them (as if they were
        batched alone): L_img and the visual part of L_sym over the rows that ran the latent phase (an image),
        L_text and the text part of L_sym over those that also have a rationale (a row whose
        `rationale_attention_mask` is all 0 has none). A term with no such row is 0, still tied to the graph.

        In training, the modules a term calls are called on every step, also where no row needs them (on a masked
        row, weight 0): under FSDP and DeepSpeed ZeRO-3 a call gathers the module's parameters from every rank, so all
        ranks must make the same calls whatever their rows hold.
        """
        config = self.config
        inputs = self._latent_loss_inputs(
            outputs, pixel_values, rationale_input_ids, rationale_attention_mask, compute
        )
        if inputs is None:
            return {}
        rows, text_rows, rationale_input_ids, rationale_attention_mask = inputs
        losses: dict[str, torch.Tensor] = {}
        if config.sym_loss_weight > 0:
            text_part, visual_part = self._alignment(
                outputs, rows, text_rows, rationale_input_ids, rationale_attention_mask
            )
            # tied to the head and the Extractor also where a part has rows only on other ranks (DDP sees them used)
            tie = self._zero_loss(outputs, self.alignment_head)
            text_part = tie if text_part is None else text_part + tie
            visual_part = tie if visual_part is None else visual_part + tie
            losses.update(
                alignment_loss=text_part + visual_part,
                alignment_text_loss=text_part,
                alignment_visual_loss=visual_part,
            )
        if config.text_loss_weight > 0:
            if text_rows.any():
                losses["text_reconstruction_loss"] = self.text_prefix_reconstruction_loss(
                    self._flat_latents(outputs, text_rows),
                    rationale_input_ids[text_rows],
                    rationale_attention_mask[text_rows],
                )
            else:
                losses["text_reconstruction_loss"] = self._zero_loss(outputs)
                masked_call = self._masked_text_reconstruction(outputs, rationale_input_ids)
                if masked_call is not None:
                    losses["text_reconstruction_loss"] = losses["text_reconstruction_loss"] + masked_call
        if config.image_loss_weight > 0:
            image_loss = self._image_reconstruction_loss(
                outputs, rows, pixel_values, compute, input_ids, attention_mask
            )
            if image_loss is not None:
                losses["image_reconstruction_loss"] = image_loss
        return losses

    def _latent_loss_inputs(
        self,
        outputs: LaReModelOutputWithPast,
        pixel_values: torch.Tensor | None,
        rationale_input_ids: torch.LongTensor | None,
        rationale_attention_mask: torch.Tensor | None,
        compute: bool | None,
    ) -> tuple[torch.BoolTensor, torch.BoolTensor, torch.LongTensor | None, torch.Tensor | None] | None:
        """`(rows, text_rows, rationale_input_ids, rationale_attention_mask)` for the latent losses: the rows that ran
        the latent phase, those of them with a rationale, and the rationale (all-0 placeholders when training without
        one); None when no latent loss is computed."""
        config = self.config
        if compute is False:
            return None
        if compute is None and rationale_input_ids is None:
            if not self.training or outputs.latent_embeds is None:
                return None
            # training without a rationale: no row has one, so L_text and L_Z<->T are 0 (tied to the graph) and the
            # terms that need only the image and the latents, L_img and L_Z<->V, train
            batch = outputs.last_hidden_state.shape[0]
            rationale_input_ids = torch.zeros(batch, 1, dtype=torch.long, device=outputs.last_hidden_state.device)
            rationale_attention_mask = torch.zeros_like(rationale_input_ids)
        rows = outputs.latent_rows.bool() if outputs.latent_rows is not None else None
        if rows is None and pixel_values is None:  # a text-only batch: no sample has what the latent losses need
            # (in sharded training, a text-only rank among image ranks got a phantom image row instead: see
            # `synchronise_module_calls`; here every rank is text-only and all make the same calls)
            hidden = outputs.last_hidden_state
            rows = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        if rows is None:
            if compute:
                raise ValueError(
                    "Latent losses were asked for but the batch has no latent steps; build it with num_latent_steps "
                    "> 0 (stage I trains without latent losses)."
                )
            return None
        needs_rationale = config.sym_loss_weight > 0 or config.text_loss_weight > 0
        if needs_rationale and rationale_input_ids is None:
            raise ValueError(
                "The symmetric alignment (Eq. 6) and text reconstruction (Eq. 8) losses need the explicit rationale: "
                "pass rationale_input_ids / rationale_attention_mask (LaReDataCollator with with_rationale=True), "
                "or set sym_loss_weight and text_loss_weight to 0."
            )
        if rationale_input_ids is not None and rationale_attention_mask is None:
            rationale_attention_mask = torch.ones_like(rationale_input_ids)
        text_rows = rows
        if rationale_input_ids is not None:
            text_rows = rows & rationale_attention_mask.to(rows.device).bool().any(dim=1)
        return rows, text_rows, rationale_input_ids, rationale_attention_mask

    def _parameters_sharded(self) -> bool:
        """Whether the language model's layers are sharded by FSDP2 (DTensor parameters outside their unit's forward)
        or DeepSpeed ZeRO-3 (partitioned parameters)."""
        return any(
            isinstance(parameter, DTensor) or hasattr(parameter, "ds_id")
            for parameter in self.model.language_model.parameters()
        )

    def _zero_loss(self, outputs: LaReModelOutputWithPast, head: nn.Module | None = None) -> torch.Tensor:
        """A term without a valid row: 0, connected to the graph and to the trainable parameters of the Extractor
        and of its head, so that backward works in any stage and DDP sees those parameters used on every step. A
        parameter sharded by FSDP2 (a DTensor outside its unit's forward) or DeepSpeed ZeRO-3 is left out: it cannot
        be read here, and those engines do not need every parameter used."""
        tensors = [outputs.last_hidden_state] + [
            parameter
            for module in (self.model.extractor, head)
            if module is not None
            for parameter in module.parameters()
            if parameter.requires_grad and not isinstance(parameter, DTensor) and not hasattr(parameter, "ds_id")
        ]
        return torch.stack([(tensor.float() * 0).sum() for tensor in tensors]).sum()

    def _alignment(
        self,
        outputs: LaReModelOutputWithPast,
        rows: torch.BoolTensor,
        text_rows: torch.BoolTensor,
        rationale_input_ids: torch.LongTensor | None,
        rationale_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Eq. 6 by the alignment head, as `(L_Z<->T over text_rows, L_Z<->V over rows)`: the latents Z, the window
        features V_s and (for the text part) the LM's hidden states of the rationales T; a part without rows is None.

        Under `torch.distributed` every rank joins both parts' gathers on every step, with 0 rows when it has none
        (a text-only batch, no rationale), so that the collectives of all ranks stay in step; in training the language
        model reads a rationale on every rank (the first row's, masked, weight 0, where no row has one)."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (rows.any() or distributed):
            return None, None
        # 0 rows still tied to the graph: every rank must also run the gathers' backward (all-to-all) in step.
        empty = outputs.last_hidden_state[:0, :1]
        latents = visual = empty
        if rows.any():
            latents = self._flat_latents(outputs, rows)
            window_features = outputs.window_features[rows]
            visual = window_features.reshape(window_features.shape[0], -1, window_features.shape[-1])
        text_hidden = text_mask = masked_call = None
        if rationale_input_ids is not None and (text_rows.any() or distributed):
            text_hidden = empty
            if text_rows.any():
                text_mask = rationale_attention_mask[text_rows]
                text_hidden = self.model.language_model(
                    input_ids=rationale_input_ids[text_rows], attention_mask=text_mask, use_cache=False
                ).last_hidden_state
        if self.training and rationale_input_ids is not None and not text_rows.any():
            # no rationale here: the language model still reads one (masked, weight 0) as ranks with one do
            masked_call = self.model.language_model(
                input_ids=rationale_input_ids[:1],
                attention_mask=torch.ones_like(rationale_input_ids[:1]),
                use_cache=False,
            ).last_hidden_state
        _, text_part, visual_part = self.alignment_head(
            latents, None, text_hidden, text_mask, visual, None, text_rows=text_rows[rows]
        )
        if masked_call is not None:
            masked_call = (masked_call.float() * 0).sum()
            text_part = masked_call if text_part is None else text_part + masked_call
        return text_part, visual_part

    def _masked_text_reconstruction(
        self, outputs: LaReModelOutputWithPast, rationale_input_ids: torch.LongTensor | None
    ) -> torch.Tensor | None:
        """L_text where no row has a rationale: in training, the calls of Eq. 8 on the first row, times 0, so that
        every rank makes the same module calls (FSDP and ZeRO-3 gather a module's parameters collectively when it is
        called); None otherwise."""
        if not self.training or outputs.latent_embeds is None or rationale_input_ids is None:
            return None
        first = torch.zeros(outputs.latent_embeds.shape[0], dtype=torch.bool, device=outputs.latent_embeds.device)
        first[0] = True
        target_ids = rationale_input_ids[:1]
        loss = self.text_prefix_reconstruction_loss(
            self._flat_latents(outputs, first), target_ids, torch.ones_like(target_ids)
        )
        return loss * 0

    def text_prefix_reconstruction_loss(
        self, latents: torch.Tensor, rationale_input_ids: torch.LongTensor, rationale_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 8: from the latent tokens alone (no image, no prompt) the LM predicts the first
        `text_prefix_length` rationale tokens (teacher forcing), cross-entropy with padding ignored."""
        prefix_length = min(self.config.text_prefix_length, rationale_input_ids.shape[1])
        target_ids = rationale_input_ids[:, :prefix_length]
        target_mask = rationale_attention_mask[:, :prefix_length]
        num_latents = latents.shape[1]
        inputs_embeds = torch.cat([latents, self.get_input_embeddings()(target_ids[:, :-1])], dim=1)
        attention_mask = torch.cat([target_mask.new_ones(latents.shape[:2]), target_mask[:, :-1]], dim=1)
        hidden = self.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        logits = self.lm_head(hidden[:, num_latents - 1 :])
        return text_prefix_loss(logits, target_ids, target_mask)

    def _image_reconstruction_loss(
        self,
        outputs: LaReModelOutputWithPast,
        rows: torch.BoolTensor,
        pixel_values: torch.Tensor | None,
        compute: bool | None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Eq. 7 over the crops of every latent step's window in `rows` (None without a reconstructor), each
        (sample, step) with its own noise seed (`noise_seeds` of `image_loss_draws`)."""
        if self.reconstructor is None:
            if compute:
                raise ValueError(
                    "image_loss_weight > 0 but this checkpoint has no reconstructor (use_reconstructor=False); "
                    "set image_loss_weight=0 or build the model with use_reconstructor=True."
                )
            return None
        if not rows.any():
            zero = self._zero_loss(outputs, self.reconstructor)
            if self.training and outputs.latent_embeds is not None and pixel_values is not None:
                # no row here: the reconstructor still runs (on the first row, weight 0) as on ranks with rows
                crops = self.reconstructor.crop_windows(
                    pixel_values[:1], outputs.window_positions[:1, 0], self.config.effective_window_size
                )
                seeds = torch.zeros(1, dtype=torch.long)
                zero = zero + self.reconstructor(outputs.latent_embeds[:1, 0], crops, seeds=seeds) * 0
            return zero
        _, num_steps, m, hidden = outputs.latent_embeds.shape
        positions = outputs.window_positions[rows].reshape(-1, 2)
        crops = self.reconstructor.crop_windows(
            pixel_values.repeat_interleave(num_steps, dim=0), positions, self.config.effective_window_size
        )
        row_ids = input_ids[rows.to(input_ids.device)] if input_ids is not None else None
        row_mask = attention_mask[rows.to(attention_mask.device)] if attention_mask is not None else None
        seeds = noise_seeds(row_ids, row_mask, pixel_values, num_steps, self.image_loss_draws)
        return self.reconstructor(outputs.latent_embeds[rows].reshape(-1, m, hidden), crops, seeds=seeds)

    def window_grounding_loss(
        self, outputs: LaReModelOutputWithPast, window_targets: torch.LongTensor
    ) -> torch.Tensor:
        """-log of step k's saliency share (its map normalised over the image tokens) at `window_targets[:, k]`,
        averaged over the steps that have a target, in rows that ran the latent phase (0, tied to the graph, when
        none has). Not in the paper: the window is the argmax of this map, so this is what gives its choice a
        gradient (`window_loss_weight`)."""
        if outputs.saliency_maps is None:
            return outputs.last_hidden_state.float().sum() * 0
        if self.is_activation_checkpointing and self.training:
            raise ValueError(
                "The window-grounding loss (window_loss_weight > 0) records the saliency inside autograd, which "
                "gradient checkpointing would recompute without it; disable gradient checkpointing for it."
            )
        saliency = outputs.saliency_maps.flatten(2).float()  # [batch, steps, image tokens]
        batch, steps, num_tokens = saliency.shape
        check_tensor("window_targets", window_targets, dims=2, integer=True)
        if window_targets.shape[0] != batch:
            raise ValueError(f"window_targets has {window_targets.shape[0]} rows but the batch has {batch}.")
        targets = window_targets.to(saliency.device)[:, :steps]
        if targets.shape[1] < steps:
            targets = F.pad(targets, (0, steps - targets.shape[1]), value=-100)
        if (((targets < 0) & (targets != -100)) | (targets >= num_tokens)).any():
            raise ValueError(
                f"window_targets must hold image-token indices in [0, {num_tokens}) or -100 (no target), got "
                f"{sorted(set(targets.flatten().tolist()))}."
            )
        valid = (targets >= 0) & outputs.latent_rows.bool().to(saliency.device)[:, None]
        share = saliency / saliency.sum(-1, keepdim=True).clamp_min(1e-12)
        picked = share.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        if not valid.any():
            return (share * 0).sum()
        return -picked.clamp_min(1e-12).log()[valid].mean()

    @staticmethod
    def _flat_latents(outputs: LaReModelOutputWithPast, rows: torch.BoolTensor) -> torch.Tensor:
        """The latent tokens of `rows`, all K steps concatenated: `[rows, K*m, D]`."""
        latents = outputs.latent_embeds[rows]
        return latents.reshape(latents.shape[0], -1, latents.shape[-1])


__all__ = ["LOSS_TERMS", "LOSS_TERM_NAMES", "LaReLatentLossesMixin", "LossTerm"]
