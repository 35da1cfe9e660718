"""PyTorch LaRe model: a LLaVA-shaped VLM that reasons through latent refocusing (Sec. 3.1, Appendix B)."""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModel,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_masks_for_generate
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import select_hidden_states

from .builders import from_components
from .checkpointing import checkpoint_through_cache
from .configuration_lare import LaReConfig
from .extractor import LaReExtractor
from .latent_loop import LatentHalting, LatentStep, LatentTrace
from .latent_losses import LaReLatentLossesMixin
from .latent_region import LatentLayout, latent_layout, rewrite_latent_steps
from .losses import LaReAlignmentHead
from .model_card import write_model_card
from .reconstruction import LaReImageReconstructor
from .refocus import (
    SaliencyRecorder,
    check_latent_halting,
    record_saliency,
    select_windows,
)
from .validation import (
    check_continuation,
    check_forward_kwargs,
    check_generation_inputs,
    check_halting_mask,
    check_halting_not_in_training,
    check_model_inputs,
    check_training_inputs,
    warn_placeholders_without_pixels,
)


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


class LaReMultiModalProjector(nn.Module):
    """2-layer MLP mapping vision features to the LM hidden size: V_T (Sec. 3.1)."""

    def __init__(self, config: LaReConfig):
        super().__init__()
        self.linear_1 = nn.Linear(
            config.vision_config.hidden_size, config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(
            config.text_config.hidden_size, config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


def broken_weight_file_message(checkpoint, error: Exception) -> str:
    """Name the weight file of a local checkpoint that safetensors cannot read."""
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(str(checkpoint))
    broken = []
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception:  # noqa: BLE001  (safetensors raises its own error type)
            broken.append(str(file))
    where = ", ".join(broken) if broken else f"a weight file of {checkpoint}"
    return f"{where} is corrupt or truncated ({error}); re-download the checkpoint or save it again."


class LaRePreTrainedModel(PreTrainedModel):
    config: LaReConfig
    config_class = LaReConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load as usual; a corrupt or truncated weight file is reported by its name."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(broken_weight_file_message(pretrained_model_name_or_path, error)) from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual; when the custom code is exported, map every LaRe Auto class to it. Writes the model card
        (README.md: components, licenses, stage history, evaluation reports, citation; see `model_card.py`)."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update(
                {
                    "AutoConfig": "configuration_lare.LaReConfig",
                    "AutoModel": "modeling_lare.LaReModel",
                    "AutoModelForImageTextToText": "modeling_lare.LaReForConditionalGeneration",
                }
            )
            self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_model_card(save_directory)  # a README.md the user wrote is left as it is
        return result

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        """transformers' layer-wise gradient checkpointing, with the language model's layers checkpointing through
        the KV cache the latent loop lives on (see `checkpoint_through_cache`)."""
        super()._set_gradient_checkpointing(
            enable=enable,
            gradient_checkpointing_func=checkpoint_through_cache(gradient_checkpointing_func),
            every_n_layers=every_n_layers,
        )
        for module in self.get_decoder().modules():
            if isinstance(module, GradientCheckpointingLayer):
                # The wrapper restores the cache entry before a replay, so the layer may keep its cache.
                module._can_checkpoint_with_cache = enable

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LaReExtractor):
            std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
            init.normal_(module.slot_embeddings, std=std)  # leaves a loaded tensor untouched
        elif isinstance(module, LaReAlignmentHead):
            module.reset_parameters()  # learnable log(1/tau) starts at log(1/alignment_temperature)


class LaReModel(LaRePreTrainedModel):
    """Vision tower + projector + language model + Extractor, and the latent refocusing loop (Eq. 1-5)."""

    # A full checkpoint (LaReForConditionalGeneration) also holds the LM head and the training-only heads of
    # Sec. 3.2; the headless model (AutoModel) does not use them.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^alignment_head\.", r"^reconstructor\."]

    def __init__(self, config: LaReConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LaReMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.extractor = LaReExtractor(config) if config.use_extractor else None
        self.post_init()
        self.freeze_unused_vision_parameters()

    def unused_vision_parameter_names(self) -> list[str]:
        """The vision tower's parameters that no output of LaRe depends on: V_T is read from
        `hidden_states[vision_feature_layer]`, so the encoder layers after it and the tower's own output heads
        (`post_layernorm`, a pooling `head`) are never reached (LLaVA keeps them the same way)."""
        num_layers = self.config.vision_config.num_hidden_layers
        layers_used = self.config.vision_feature_layer % (num_layers + 1)  # hidden_states[j] = after j layers
        unused = []
        for name, _ in self.vision_tower.named_parameters():
            layer = re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.", name)
            head = re.search(r"(?:^|\.)(post_layernorm|head)\.", name)
            if (layer is not None and int(layer.group(1)) >= layers_used) or head is not None:
                unused.append(name)
        return unused

    def freeze_unused_vision_parameters(self) -> None:
        """Set `requires_grad=False` on `unused_vision_parameter_names()`: no loss can give them a gradient, so an
        optimizer or DDP (which otherwise needs `find_unused_parameters=True`) should not expect one. Re-applied by
        `train()`, since `from_pretrained` recreates loaded parameters with `requires_grad=True`."""
        parameters = dict(self.vision_tower.named_parameters())
        for name in self.unused_vision_parameter_names():
            parameters[name].requires_grad_(False)

    def train(self, mode: bool = True) -> LaReModel:
        super().train(mode)
        self.freeze_unused_vision_parameters()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    @select_hidden_states(lambda model: model.config.vision_feature_layer)
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Vision tower outputs with `pooler_output` = the features of `vision_feature_layer` (CLS dropped),
        projected: V_T `[images, tokens, D]` (as transformers' VLMs return them). `kwargs` go to the vision tower
        (`output_attentions`, `output_hidden_states`: by default only the feature layer is captured)."""
        image_size = self.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, image_size, image_size):
            raise ValueError(
                f"pixel_values must have shape [num_images, 3, {image_size}, {image_size}] for this model, got "
                f"{tuple(pixel_values.shape)}. Preprocess images with the model's LaReProcessor."
            )
        kwargs.pop("return_dict", None)
        vision_dtype = self.vision_tower.dtype
        outputs = self.vision_tower(pixel_values.to(vision_dtype), return_dict=True, **kwargs)
        features = outputs.hidden_states[self.config.vision_feature_layer][:, 1:]  # CLS dropped (strategy "default")
        outputs.pooler_output = self.multi_modal_projector(features)
        return outputs

    def get_placeholder_ids(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """Token ids of the `<|image|>` and latent-region placeholders in `inputs_embeds`, found by comparing each
        position with their token embeddings (as transformers' VLMs find image tokens); -1 elsewhere. Embeddings
        whose latent slots are already filled (no `<|latent|>` embedding left) have no latent region to run."""
        embedding = self.get_input_embeddings()
        config = self.config

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

    def latent_layout(self, input_ids: torch.LongTensor) -> LatentLayout:
        """The latent region of `input_ids`, checked (see `latent_region.latent_layout`)."""
        return latent_layout(input_ids, self.config)

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]:
        """Token embeddings (`inputs_embeds` when given, `input_ids` then only locating the placeholders) with the
        visual tokens scattered into the `<|image|>` positions.

        Returns the embeddings, V_T per sample `[batch, tokens, D]` and the columns of the image tokens
        `[batch, tokens]`, when every sample has one image or none (a row without one gets zero features and the
        placeholder columns 0..tokens-1); None, None otherwise (no image, or several in a sample).
        """
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:  # text only: placeholders are ordinary tokens (see `forward`)
            return inputs_embeds, None, None
        image_mask = input_ids == self.config.image_token_id
        num_placeholders = int(image_mask.sum())
        seq_len = self.config.image_seq_length
        num_images = pixel_values.shape[0]
        if num_placeholders != num_images * seq_len:
            raise ValueError(
                f"Got {num_images} image(s) but {num_placeholders} <|image|> tokens; each image needs exactly "
                f"{seq_len} tokens (image_seq_length). Put one <|image|> per image in the text and let "
                "LaReProcessor expand it."
            )
        image_features = self.get_image_features(pixel_values).pooler_output.to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(
            image_mask.unsqueeze(-1), image_features.reshape(-1, image_features.shape[-1])
        )
        per_row = image_mask.sum(dim=1)
        batch = input_ids.shape[0]
        if (per_row == seq_len).all():
            image_positions = image_mask.nonzero()[:, 1].view(batch, seq_len)
            return inputs_embeds, image_features.view(batch, seq_len, -1), image_positions
        if ((per_row == seq_len) | (per_row == 0)).all():  # image rows and text-only rows
            rows = (per_row == seq_len)[:, None, None]
            hidden = image_features.shape[-1]
            features = image_features.new_zeros(batch, seq_len, hidden).masked_scatter(
                rows.expand(-1, seq_len, hidden), image_features.reshape(-1, hidden)
            )
            image_positions = torch.arange(seq_len, device=input_ids.device).repeat(batch, 1)
            image_positions[rows[:, 0, 0]] = image_mask.nonzero()[:, 1].view(-1, seq_len)
            return inputs_embeds, features, image_positions
        return inputs_embeds, None, None

    @torch.no_grad()
    def embedding_scale(self) -> torch.Tensor:
        """RMS of the LM's token embeddings, the scale latents are normalised to. A statistic over the whole
        vocabulary, so it is recomputed only when the embedding weight changed (an optimizer step, a resize, a move)
        rather than on every forward / generate call."""
        weight = self.get_input_embeddings().weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
        cached = getattr(self, "_embedding_scale_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, weight.float().pow(2).mean().sqrt())
            self._embedding_scale_cache = cached
        return cached[1]

    def _select_window(
        self, saliency: torch.Tensor, image_features: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """The sliding window (Sec. 3.1): each sample's window position and V_s, the visual tokens of V_T under its
        most salient window; the whole grid when the window is ablated."""
        batch = image_features.shape[0]
        if not self.config.use_sliding_window:
            return torch.zeros(batch, 2, dtype=torch.long, device=image_features.device), image_features
        config = self.config
        positions, token_indices = select_windows(
            saliency, config.patch_grid_size, config.window_size, config.window_stride
        )
        index = token_indices.unsqueeze(-1).expand(-1, -1, image_features.shape[-1])
        return positions, image_features.gather(1, index)

    def _extract_latents(
        self,
        last_hidden: torch.Tensor,
        window_features: torch.Tensor,
        history: torch.Tensor | None,
        embedding_scale: torch.Tensor,
        return_attention: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Z^(k) from the Extractor (Eq. 3-5) given H^(k), V_s and Z^(<k), or the pooled window when the Extractor
        is ablated."""
        if self.extractor is not None:
            return self.extractor(last_hidden, window_features, history, embedding_scale, return_attention)
        m = self.config.latent_tokens_per_step
        pooled = F.adaptive_avg_pool1d(window_features.transpose(1, 2), m).transpose(1, 2)
        pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6) * embedding_scale
        return pooled, None

    def latent_refocus(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layout: LatentLayout,
        image_features: torch.Tensor | None,
        image_positions: torch.LongTensor | None,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool = True,
        return_extractor_attention: bool = False,
        latent_halting: str | None = None,
        latent_halting_threshold: float | None = None,
        **kwargs,
    ) -> LaReModelOutputWithPast:
        """The latent refocusing loop (Eq. 1-5), run by `forward()` for a fresh sequence (also the prefill step of
        `generate()`), in K+1 language-model calls on one KV cache:

        1. Feed the prompt through `<|latent_start|>`: H^(1) and the saliency of its last position over V_T.
        2. For k = 1..K: select the window V_s of V_T with the largest saliency (Eq. 1-2); the Extractor turns
           (H^(k), V_s, Z^(<k)) into Z^(k) (Eq. 3-5); record the step; stop the samples that halt; for k < K feed
           Z^(k) into its m slots, which gives H^(k+1) and the next saliency.
        3. Feed the rest (Z^(K), `<|latent_end|>`, a teacher-forced answer) in one call.

        Rows without an image (`layout.rows` False) have no latent region: their tokens in the region's columns are
        fed as they are (in the same chunks, on the same cache, which gives what one pass gives), so they continue
        exactly as the prompt alone with K=0; the windows and latents the loop computes for them are discarded.
        Adaptive halting (Table 4; `latent_halting` = "cosine" | "l1" | "l2" with `latent_halting_threshold`): see
        `LatentHalting`; once every sample has halted the remaining steps are not computed.

        `kwargs` (`output_attentions`, `output_hidden_states`, ...) go to every language-model call; the returned
        `hidden_states` / `attentions` cover every position, one entry per layer, as a single pass would.
        """
        check_latent_halting(latent_halting, latent_halting_threshold)
        check_halting_mask(latent_halting, attention_mask)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if layout.num_steps == 0:
            # one pass of the language model alone (packed sequences included: no mask, no cache)
            lm_output = self._single_pass(inputs_embeds, attention_mask, position_ids, cache, use_cache, **kwargs)
            return self._merge_lm_calls(
                {"image_hidden_states": image_features}, [lm_output], lm_output.past_key_values
            )
        if image_features is None:
            raise ValueError(
                "Latent refocusing needs one image per prompt with a latent region (its <|image|> tokens and "
                "pixel_values); use num_latent_steps=0 for multi-image prompts."
            )
        own_cache = cache is None
        cache = DynamicCache(config=self.config.text_config) if own_cache else cache
        m, slots_start = self.config.latent_tokens_per_step, layout.start + 1
        rows = layout.rows.to(inputs_embeds.device) if layout.rows is not None else None
        trace = LatentTrace(rows=None if rows is None or bool(rows.all()) else rows)
        halting = LatentHalting(
            latent_halting, latent_halting_threshold, trace.rows, layout.num_steps, attention_mask, position_ids,
            (slots_start, slots_start + layout.num_steps * m, m), inputs_embeds.shape[0], inputs_embeds.device,
        )  # fmt: skip
        embedding_scale = self.embedding_scale().to(inputs_embeds.dtype)
        feed = functools.partial(self._feed, halting=halting, cache=cache, image_positions=image_positions, **kwargs)
        lm_output, saliency = feed(inputs_embeds[:, :slots_start], 0)  # H^(1) and its saliency
        lm_calls = [lm_output]
        for step in range(layout.num_steps):
            window_position, window_features = self._select_window(saliency, image_features)  # Eq. 1-2: V_s
            latents, extractor_attention = self._extract_latents(  # Eq. 3-5: Z^(k)
                lm_output.last_hidden_state[:, -1], window_features, trace.history(), embedding_scale,
                return_extractor_attention,
            )  # fmt: skip
            slot_embeds = inputs_embeds[:, slots_start + step * m : slots_start + (step + 1) * m]
            trace.record(
                LatentStep(latents, saliency, window_position, window_features, extractor_attention), slot_embeds
            )
            if halting.update(step, trace) or step == layout.num_steps - 1:
                break
            lm_output, saliency = feed(trace.latents, slots_start + step * m)  # H^(k+1)
            lm_calls.append(lm_output)
        # the last computed step's latents, then (after an early stop: masked, unused slots) <|latent_end|> and the rest
        tail_start = slots_start + (len(trace.steps) - 1) * m
        tail_embeds = torch.cat([trace.latents, inputs_embeds[:, tail_start + m :]], dim=1)
        lm_calls.append(feed(tail_embeds, tail_start, with_saliency=False)[0])
        fields = {
            "image_hidden_states": image_features,
            **trace.output_fields(self.config.patch_grid_size, return_extractor_attention),
            "latent_rows": rows.long() if rows is not None else torch.ones_like(halting.steps_used),
            **halting.output_fields(),
        }
        if (
            own_cache
            and torch.is_grad_enabled()
            and (kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))
        ):
            replay = self._replay(inputs_embeds, trace, slots_start, halting, use_cache, **kwargs)
            return self._merge_lm_calls(fields, [replay], replay.past_key_values)
        return self._merge_lm_calls(fields, lm_calls, cache if use_cache else None)

    def _feed(
        self,
        inputs_embeds: torch.Tensor,
        start: int,
        halting: LatentHalting,
        cache: Cache,
        image_positions: torch.LongTensor,
        with_saliency: bool = True,
        **kwargs,
    ) -> tuple[BaseModelOutputWithPast, torch.Tensor | None]:
        """Feed the positions [start, start + length) on top of the cache, with the mask and positions of
        `halting`; `kwargs` (output_attentions, ...) go to the language model. Returns its output and (with
        `with_saliency`) the saliency of its last position over the image tokens, recorded on the language model's
        own attention backend."""
        end = start + inputs_embeds.shape[1]
        recorder = None
        if with_saliency:
            track_saliency = self.config.window_loss_weight > 0 and self.training  # for the window-grounding loss
            num_layers = self.config.text_config.num_hidden_layers
            recorder = SaliencyRecorder(image_positions, self.config.saliency_layers, num_layers, track_saliency)
            kwargs["saliency_recorder"] = recorder
        with record_saliency(self.language_model, recorder):
            lm_output = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=halting.attention_mask[:, :end],
                position_ids=halting.position_ids[..., start:end],
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            )
        return lm_output, recorder.saliency() if recorder is not None else None

    def _replay(
        self,
        inputs_embeds: torch.Tensor,
        trace: LatentTrace,
        slots_start: int,
        halting: LatentHalting,
        use_cache: bool,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The finished sequence (prompt, latents, tail) in one pass. The per-layer outputs of the loop's calls are
        joined after the fact, so no later computation reads the joined tensors and `retain_grad()` on them would
        see no gradient; with autograd on and per-layer outputs asked for, this pass gives the same values (causal
        attention over the same embeddings) and the same gradients, through tensors the outputs depend on."""
        m = self.config.latent_tokens_per_step
        final_embeds = torch.cat(
            [
                inputs_embeds[:, :slots_start],
                *(step.latents for step in trace.steps),
                inputs_embeds[:, slots_start + len(trace.steps) * m :],
            ],
            dim=1,
        )
        return self._single_pass(final_embeds, halting.attention_mask, halting.position_ids, None, use_cache, **kwargs)

    def _single_pass(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The language model over a whole sequence at once (its own cache when `cache` is None and `use_cache`);
        `past_key_values` of the result is None without `use_cache`."""
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache,
            **kwargs,
        )
        if not use_cache:
            outputs.past_key_values = None
        return outputs

    @staticmethod
    def _merge_lm_calls(
        fields: dict[str, torch.Tensor | None], lm_calls: list[BaseModelOutputWithPast], cache: Cache | None
    ) -> LaReModelOutputWithPast:
        """The model output of the language-model calls of a run, joined along the sequence, with the latent `fields`: last hidden state, per-layer hidden
        states, and per-layer attention maps (each call's keys padded to the longest with zeros, the weight a causal
        single pass gives to future positions)."""
        if len(lm_calls) == 1:  # one pass: its own tensors (a copy would cut them off the graph of the outputs)
            (outputs,) = lm_calls
            return LaReModelOutputWithPast(
                last_hidden_state=outputs.last_hidden_state,
                past_key_values=cache,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                **fields,
            )
        hidden_states = attentions = None
        if lm_calls[0].hidden_states is not None:
            # layers left out of `output_hidden_states=[indices]` are None in every call
            hidden_states = tuple(
                torch.cat(layer_states, dim=1) if layer_states[0] is not None else None
                for layer_states in zip(*(outputs.hidden_states for outputs in lm_calls))
            )
        if lm_calls[0].attentions:
            merged = []
            for layer_maps in zip(*(outputs.attentions for outputs in lm_calls)):
                if layer_maps[0] is None:
                    merged.append(None)
                    continue
                key_length = max(attention.shape[-1] for attention in layer_maps)
                merged.append(
                    torch.cat([F.pad(attention, (0, key_length - attention.shape[-1])) for attention in layer_maps], 2)
                )
            attentions = tuple(merged)
        return LaReModelOutputWithPast(
            last_hidden_state=torch.cat([outputs.last_hidden_state for outputs in lm_calls], dim=1),
            past_key_values=cache,
            hidden_states=hidden_states,
            attentions=attentions,
            **fields,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_extractor_attention: bool = False,
        latent_halting: str | None = None,
        latent_halting_threshold: float | None = None,
        **kwargs,
    ) -> LaReModelOutputWithPast:
        """A fresh sequence (no cache, or an empty one) runs the refocusing loop and the teacher-forced tail; with a
        filled cache (decoding) the new positions go through the language model on top of it.

        `latent_halting` / `latent_halting_threshold`: adaptive halting of the latent phase (see `latent_refocus`);
        they concern a fresh sequence only.

        The image and latent placeholders are located in `input_ids`, or in `inputs_embeds` by comparing with their
        token embeddings. Without `pixel_values` the input is read as text: placeholders embed as ordinary tokens and
        no latent phase runs (as LLaVA reads its image token without pixels; a warning says so once).
        `output_attentions` / `output_hidden_states` give one entry per language-model layer over every fed position
        (prompt, latent slots, tail), also with autograd on (the finished sequence is then replayed in one pass, see
        `latent_refocus`); `use_cache` defaults to the text config's.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        check_forward_kwargs(f"{type(self).__name__}.forward", kwargs, inspect.signature(self.forward).parameters)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        self.check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, pixel_values, past_length)
        text_config = self.config.get_text_config()
        use_cache = use_cache if use_cache is not None else getattr(text_config, "use_cache", True)
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        kwargs.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        placeholder_ids = input_ids if input_ids is not None else self.get_placeholder_ids(inputs_embeds)

        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            check_continuation(self.config, placeholder_ids)
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            outputs = self._single_pass(
                inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, **kwargs
            )
            return self._merge_lm_calls({}, [outputs], outputs.past_key_values)

        if pixel_values is None:
            layout = LatentLayout(start=None, num_steps=0)
            warn_placeholders_without_pixels(self.config, placeholder_ids)
        else:
            layout = self.latent_layout(placeholder_ids)
        if attention_mask is None and layout.num_steps:
            attention_mask = torch.ones(placeholder_ids.shape, dtype=torch.long, device=placeholder_ids.device)
        inputs_embeds, image_features, image_positions = self.embed_multimodal(
            placeholder_ids, pixel_values, inputs_embeds
        )
        return self.latent_refocus(
            inputs_embeds,
            attention_mask,
            layout,
            image_features,
            image_positions,
            cache=past_key_values,
            position_ids=position_ids,
            use_cache=use_cache,
            return_extractor_attention=return_extractor_attention,
            latent_halting=latent_halting,
            latent_halting_threshold=latent_halting_threshold,
            **kwargs,
        )

    def check_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        past_length: int = 0,
    ) -> None:
        """The checks `forward()` runs on its inputs before anything is computed (see
        `validation.check_model_inputs`)."""
        vocab_size = self.get_input_embeddings().weight.shape[0]
        check_model_inputs(
            self.config, vocab_size, input_ids, inputs_embeds, attention_mask, position_ids, pixel_values, past_length
        )


class LaReForConditionalGeneration(LaReLatentLossesMixin, LaRePreTrainedModel, GenerationMixin):
    """LaRe with a language-modeling head; `generate()` runs the latent loop, then decodes with GenerationMixin."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As Qwen2ForCausalLM / LlavaForConditionalGeneration; the language model's own plans come from its config.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    # Trainer must scale the (multi-term) loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: LaReConfig):
        super().__init__(config)
        self.model = LaReModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # Semantic augmentation (Sec. 3.2): training-only heads; inference-only checkpoints may drop the U-Net.
        self.alignment_head = LaReAlignmentHead(config)
        self.reconstructor = (
            LaReImageReconstructor(config, condition_dim=config.text_config.hidden_size)
            if config.use_reconstructor
            else None
        )
        self.post_init()
        if self.generation_config is not None and not self.generation_config.suppress_tokens:
            # Image and latent tokens are written by the processor and the latent loop, never decoded.
            self.generation_config.suppress_tokens = [
                config.image_token_id,
                config.latent_start_token_id,
                config.latent_token_id,
                config.latent_end_token_id,
            ]

    @classmethod
    def from_components(
        cls,
        vision: str | os.PathLike | PreTrainedModel,
        text: str | os.PathLike | PreTrainedModel,
        special_token_ids: dict[str, int] | None = None,
        vocab_size: int | None = None,
        image_tokenizer: str | nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **config_kwargs,
    ) -> LaReForConditionalGeneration:
        """Assemble a LaRe model from a pretrained vision encoder and a pretrained causal LM (Sec. 4.2 setup); see
        `builders.from_components` for the arguments."""
        return from_components(
            cls,
            vision,
            text,
            special_token_ids=special_token_ids,
            vocab_size=vocab_size,
            image_tokenizer=image_tokenizer,
            tokenizer=tokenizer,
            **config_kwargs,
        )

    def _set_generation_defaults(
        self, lm_generation_config: GenerationConfig | None, tokenizer: PreTrainedTokenizerBase | None
    ) -> None:
        """Greedy decoding with the LM's own end/pad/bos tokens (its generation config first, else its tokenizer's),
        so that a text-only prompt with K = 0 decodes exactly as the standalone LM does."""
        generation_config = self.generation_config
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(lm_generation_config, name, None) if lm_generation_config is not None else None
            if value is None and tokenizer is not None:
                value = getattr(tokenizer, name, None)
            if value is not None:
                setattr(generation_config, name, value)
        if generation_config.pad_token_id is None and tokenizer is not None:
            generation_config.pad_token_id = tokenizer.eos_token_id
        generation_config.do_sample = False
        generation_config.max_new_tokens = 64

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """See `LaReModel.get_image_features`: `pooler_output` holds the projected visual tokens V_T."""
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        rationale_input_ids: torch.LongTensor | None = None,
        rationale_attention_mask: torch.Tensor | None = None,
        window_targets: torch.LongTensor | None = None,
        compute_latent_losses: bool | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_extractor_attention: bool = False,
        latent_halting: str | None = None,
        latent_halting_threshold: float | None = None,
        **kwargs,
    ) -> LaReCausalLMOutputWithPast:
        r"""
        Teacher-forced forward over `prompt <|latent_start|> [K*m slots] <|latent_end|> answer`: the latent loop
        fills the slots (Eq. 1-5), then the answer is scored with next-token prediction on `labels` (-100 on the
        prompt and the latent region), plus the semantic-augmentation losses (Eq. 6-8, summed with L_ntp as in Eq. 10).

        rationale_input_ids / rationale_attention_mask: the tokenized explicit rationale (right-padded), needed by
            L_Z<->T (Eq. 6) and L_text (Eq. 8).
        window_targets: `[batch, K]` index of the image token (row-major patch grid) that reasoning step k needs,
            -100 where there is none; with `window_loss_weight` > 0 they give the window-grounding loss (not in
            the paper, see `LaReConfig`).
        compute_latent_losses: True (a training stage) computes every latent loss with a non-zero weight and raises
            if its inputs are missing; False computes none; None computes them when a rationale is given, and in
            training mode without one computes those that need no rationale (L_img, the visual part of L_sym), so
            that plain `labels` training (PEFT, transformers' Trainer) reaches every module of Eq. 10.
        latent_halting / latent_halting_threshold: adaptive halting of the latent phase (Table 4), an inference
            option: "cosine" | "l1" | "l2" and the threshold at which a sample's latent steps have converged.
        kwargs: go to the language model, and to `loss_function` (`num_items_in_batch`, `shift_labels`, ...).
        """
        check_forward_kwargs(f"{type(self).__name__}.forward", kwargs, inspect.signature(self.forward).parameters)
        self.check_training_inputs(input_ids, inputs_embeds, labels, rationale_input_ids, rationale_attention_mask)
        check_halting_not_in_training(latent_halting, labels, rationale_input_ids, compute_latent_losses)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_extractor_attention=return_extractor_attention,
            latent_halting=latent_halting,
            latent_halting_threshold=latent_halting_threshold,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        lm_loss = None
        if labels is not None:
            sequence_shape = outputs.last_hidden_state.shape[:2]
            if labels.shape != sequence_shape:
                raise ValueError(
                    f"labels {tuple(labels.shape)} must have the shape of the input sequence {tuple(sequence_shape)}."
                )
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        latent_losses = self.latent_losses(
            outputs, pixel_values, rationale_input_ids, rationale_attention_mask, window_targets, compute_latent_losses
        )
        loss = self.weighted_loss(lm_loss, latent_losses)
        return LaReCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            **latent_losses,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            latent_embeds=outputs.latent_embeds,
            saliency_maps=outputs.saliency_maps,
            window_positions=outputs.window_positions,
            window_features=outputs.window_features,
            extractor_attentions=outputs.extractor_attentions,
            latent_rows=outputs.latent_rows,
            latent_steps=outputs.latent_steps,
            halted_attention_mask=outputs.halted_attention_mask,
            halted_position_ids=outputs.halted_position_ids,
        )

    def check_training_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.LongTensor | None,
        rationale_input_ids: torch.LongTensor | None,
        rationale_attention_mask: torch.Tensor | None,
    ) -> None:
        """`labels` and the rationale checked against the input sequence (see `validation.check_training_inputs`)."""
        check_training_inputs(
            self.config.text_config.vocab_size,
            input_ids,
            inputs_embeds,
            labels,
            rationale_input_ids,
            rationale_attention_mask,
        )

    @torch.no_grad()
    def reconstruct_images(
        self,
        latent_embeds: torch.Tensor,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """From latent tokens to images (Figure 4): `latent_embeds` `[B, K, m, D]` (a forward's output) or
        `[B, m, D]` -> reverse diffusion + image tokenizer decoder -> `[B, K, 3, S, S]` (or `[B, 3, S, S]`) in [0, 1].
        """
        if self.reconstructor is None:
            raise ValueError("This checkpoint has no reconstructor (use_reconstructor=False).")
        if latent_embeds.dim() == 3:
            return self.reconstructor.sample(latent_embeds, num_inference_steps, generator)
        batch, num_steps, m, hidden = latent_embeds.shape
        images = self.reconstructor.sample(
            latent_embeds.reshape(batch * num_steps, m, hidden), num_inference_steps, generator
        )
        return images.view(batch, num_steps, *images.shape[1:])

    def set_latent_steps(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, num_latent_steps: int | None
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Rewrite the latent region of each prompt with an image to `num_latent_steps` x m slots (K=0 removes it;
        None keeps its K) and remove any region from text-only prompts, left-padding with the generation config's
        pad token (see `latent_region.rewrite_latent_steps`)."""
        pad = self.generation_config.pad_token_id if self.generation_config is not None else None
        pad = pad if isinstance(pad, int) else 0
        return rewrite_latent_steps(input_ids, attention_mask, num_latent_steps, self.config, pad)

    def create_masks_for_generate(
        self, attention_mask: torch.Tensor | None = None, is_first_iteration=False, **kwargs
    ):
        """With a static cache GenerationMixin prebuilds 4D masks; the prefill step runs the latent loop, which feeds
        the sequence in several calls and builds each call's mask from the 2D padding mask, so it keeps that."""
        if is_first_iteration:
            return attention_mask
        return create_masks_for_generate(
            attention_mask=attention_mask, is_first_iteration=is_first_iteration, **kwargs
        )

    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict,
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict:
        """As GenerationMixin's; after a pass that halted samples early (adaptive halting), decoding continues with
        the mask and positions in which their unused latent slots are gone, and `generate()` reports the step
        counts."""
        if getattr(outputs, "halted_attention_mask", None) is not None:
            model_kwargs["attention_mask"] = outputs.halted_attention_mask
            if model_kwargs.get("position_ids") is not None:
                model_kwargs["position_ids"] = outputs.halted_position_ids
            self._halted_latent_steps = outputs.latent_steps
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_latent_steps: int | None = None,
        latent_halting: str | None = None,
        latent_halting_threshold: float | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate`, whose prefill step (`forward()` on the fresh prompt) runs the latent loop;
        decoding then continues from the latent-filled cache. Every decoding mode and output option of
        GenerationMixin applies (`return_dict_in_generate`, `output_scores`, beam search, `use_cache=False`, a static
        cache, `inputs_embeds`, ...), except assisted / prompt-lookup decoding, which is refused.

        `num_latent_steps` rewrites the latent region of the prompts with an image to K x m slots first (0 = plain
        LLaVA baseline). The latent phase refocuses on the image, so a text-only prompt runs without one whatever K
        is (a latent region it carries is removed): it is answered exactly as with K=0, alone or batched with image
        prompts. The returned sequences still start with the caller's `input_ids`, so `out[:, input_ids.shape[1]:]`
        is the answer for any K.

        `latent_halting` ("cosine" | "l1" | "l2") with `latent_halting_threshold`: adaptive halting (Table 4). Each
        sample stops its latent phase after the first step k >= 2 whose latents Z^(k) have converged to Z^(k-1)
        (cosine similarity >= threshold, or L1 / L2 distance <= threshold, see `latent_step_distance`), at the latest
        after K; its answer is then the one `num_latent_steps=k` gives it. With `return_dict_in_generate=True` the
        output's `latent_steps` (`[batch]`) holds each sample's step count.
        """
        check_latent_halting(latent_halting, latent_halting_threshold)
        check_generation_inputs(input_ids, num_latent_steps, latent_halting, kwargs)
        if latent_halting is not None:
            kwargs.update(latent_halting=latent_halting, latent_halting_threshold=latent_halting_threshold)
        prompt_ids = input_ids
        if input_ids is not None and input_ids.shape[1] > 0 and kwargs.get("past_key_values") is None:
            rewritten = self.set_latent_steps(
                input_ids,
                attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                num_latent_steps,
            )
            if rewritten[0] is not input_ids:
                input_ids, attention_mask = rewritten
        self._halted_latent_steps = None
        outputs = super().generate(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs
        )
        latent_steps, self._halted_latent_steps = self._halted_latent_steps, None
        if latent_steps is not None and not isinstance(outputs, torch.Tensor):
            outputs["latent_steps"] = latent_steps
        if prompt_ids is None or input_ids is prompt_ids:
            return outputs
        # K changed the prompt's length: hand back the caller's prompt followed by the new tokens.
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        repeats = sequences.shape[0] // prompt_ids.shape[0]
        sequences = torch.cat(
            [prompt_ids.repeat_interleave(repeats, dim=0), sequences[:, input_ids.shape[1] :]], dim=1
        )
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        return outputs


__all__ = ["LaRePreTrainedModel", "LaReModel", "LaReForConditionalGeneration"]
