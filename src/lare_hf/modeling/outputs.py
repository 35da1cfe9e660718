"""Model outputs of LaRe: the language model's outputs plus the record of the latent phase (Eq. 1-5) and the loss
terms (Eq. 6-8, 10)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput


def _to_tuple_nested(output: ModelOutput) -> tuple:
    """`ModelOutput.to_tuple` with a nested output (`image_outputs`) turned into its own tuple, as transformers'
    multimodal outputs do (`MultimodalModelOutput.to_tuple` in 5.25)."""
    return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in output.values())


@dataclass
class LaReModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.Tensor` of shape `(batch_size, num_image_tokens, hidden_size)`):
        The projected visual tokens V_T.
    latent_embeds (`torch.Tensor` of shape `(batch_size, K, m, hidden_size)`):
        The latent tokens Z^(1..K) written into the `<|latent|>` slots (Eq. 1-5).
    saliency_maps (`torch.Tensor` of shape `(batch_size, K, grid, grid)`):
        Attention of the last fed position to the image tokens that chose step k's window (Sec. 3.1).
    window_positions (`torch.LongTensor` of shape `(batch_size, K, 2)`):
        (row, column) in the patch grid of the top-left corner of each step's window.
    window_features (`torch.Tensor` of shape `(batch_size, K, window_tokens, hidden_size)`):
        V_s, the visual tokens under each step's window.
    extractor_attentions (`torch.Tensor` of shape `(batch_size, K, m, window_tokens)`, *optional*):
        The Extractor's last cross-attention over V_s (only with `return_extractor_attention=True`).
    latent_rows (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        1 for the rows that ran the latent phase: those with an image (and a latent region); a 0/1 mask like
        `attention_mask` (not bool, so outputs stay comparable by subtraction as transformers' tests compare them).
        A text-only row has no region and runs as its prompt with K=0; its entries of the latent fields are
        placeholders (its own token embeddings in the region's columns, zero saliency, window at (0, 0), zero window
        features). None when no row has a latent region.
    latent_steps (`torch.LongTensor` of shape `(batch_size,)`):
        The number of latent steps each sample used: K, or fewer where adaptive halting (`latent_halting`) stopped
        it; 0 for a text-only row (no latent phase). Entries of the per-step fields past a sample's count belong to
        slots it masked out.
    halted_attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
        With adaptive halting: the attention mask with each halted sample's unused latent slots set to 0 (what the
        decoding steps of `generate()` continue with).
    halted_position_ids (`torch.LongTensor`, *optional*):
        With adaptive halting: the position ids the sequence was run with (a halted sample's positions after its
        last step count on as if its unused slots were not there).
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        The vision tower's output for the images of a fresh sequence (`last_hidden_state`, `hidden_states`,
        `attentions`), with `pooler_output` = V_T, as transformers' VLMs return it (`LlavaModelOutputWithPast`).
        None when no image was processed (text only, or a decoding step on a filled cache).
    """

    image_hidden_states: torch.Tensor | None = None
    latent_embeds: torch.Tensor | None = None
    saliency_maps: torch.Tensor | None = None
    window_positions: torch.LongTensor | None = None
    window_features: torch.Tensor | None = None
    extractor_attentions: torch.Tensor | None = None
    latent_rows: torch.LongTensor | None = None
    latent_steps: torch.LongTensor | None = None
    halted_attention_mask: torch.LongTensor | None = None
    halted_position_ids: torch.LongTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        return _to_tuple_nested(self)


@dataclass
class LaReCausalLMOutputWithPast(ModelOutput):
    r"""
    loss: the weighted training objective of Eq. 10, L = L_ntp + l_sym L_sym + l_img L_img + l_text L_text, plus the
        window-grounding loss (not in the paper) weighted by `window_loss_weight` (see `weighted_loss`).
    lm_loss ... window_loss: the terms of `latent_losses.LOSS_TERMS`, in its order (None where not computed):
        lm_loss: next-token prediction on the answer tokens (L_ntp).
        alignment_loss: symmetric alignment L_sym = L_Z<->T + L_Z<->V (Eq. 6), with its two parts
            `alignment_text_loss` and `alignment_visual_loss`.
        image_reconstruction_loss: denoising score matching of the window crops conditioned on Z^(k) (Eq. 7).
        text_reconstruction_loss: cross-entropy of the rationale prefix predicted from the latents alone (Eq. 8).
        window_loss: the window-grounding loss (not in the paper; `window_loss_weight`), -log of each latent step's
            saliency share at the image token its reasoning step needs, averaged over the steps with a target.
    Other fields: see `LaReModelOutputWithPast`.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    alignment_loss: torch.Tensor | None = None
    alignment_text_loss: torch.Tensor | None = None
    alignment_visual_loss: torch.Tensor | None = None
    image_reconstruction_loss: torch.Tensor | None = None
    text_reconstruction_loss: torch.Tensor | None = None
    window_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor] | None = None
    attentions: tuple[torch.Tensor] | None = None
    image_hidden_states: torch.Tensor | None = None
    latent_embeds: torch.Tensor | None = None
    saliency_maps: torch.Tensor | None = None
    window_positions: torch.LongTensor | None = None
    window_features: torch.Tensor | None = None
    extractor_attentions: torch.Tensor | None = None
    latent_rows: torch.LongTensor | None = None
    latent_steps: torch.LongTensor | None = None
    halted_attention_mask: torch.LongTensor | None = None
    halted_position_ids: torch.LongTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        return _to_tuple_nested(self)


__all__ = ["LaReCausalLMOutputWithPast", "LaReModelOutputWithPast"]
