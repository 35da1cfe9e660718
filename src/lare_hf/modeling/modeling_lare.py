"""PyTorch LaRe model: a LLaVA-shaped VLM that reasons through latent refocusing (Sec. 3.1, Appendix B)."""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_masks_for_generate
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import select_hidden_states

from .cache_naming import CACHE_ARGUMENT, accepts_cache_argument, cache_argument, given_cache, output_cache
from .components import (
    add_lare_special_tokens,
    component_record,
    load_text_tokenizer,
    text_checkpoint,
    vision_image_normalization,
)
from .configuration_lare import LaReConfig
from .extractor import LaReExtractor
from .losses import LaReAlignmentHead, mean_max_pool, symmetric_info_nce, text_prefix_loss
from .model_card import write_model_card
from .reconstruction import LaReImageReconstructor, load_image_tokenizer
from .refocus import (
    SaliencyRecorder,
    check_latent_halting,
    latent_steps_converged,
    record_saliency,
    select_windows,
)
from .validation import check_forward_kwargs, check_pixel_values, check_tensor, check_token_ids

logger = logging.get_logger(__name__)

# Decoding modes whose draft tokens would be verified against a cache that holds latent embeddings the draft
# model never saw: they cannot give the right text, so generate() refuses them.
UNSUPPORTED_GENERATION_KWARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


@dataclass
class LaReModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.Tensor` of shape `(batch_size, num_image_tokens, hidden_size)`):
        The projected visual tokens V_T.
    latent_embeds (`torch.Tensor` of shape `(batch_size, K, m, hidden_size)`):
        The latent tokens Z^(1..K) written into the `<|latent|>` slots (Eq. 2-5).
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
    loss: the weighted training objective L = L_ntp + l_sym L_sym + l_img L_img + l_text L_text (Eq. 9-10).
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


@dataclass
class LatentLayout:
    """Where the latent region sits in a batch: `<|latent_start|>` and `<|latent_end|>` columns, number of steps K,
    and the rows that carry it (`rows`: those with an image; the latent phase refocuses on the image, so a
    text-only row has no region and runs as with K=0)."""

    start: int | None
    num_steps: int
    end: int | None = None
    rows: torch.BoolTensor | None = None

    @property
    def has_region(self) -> bool:
        return self.start is not None


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


class LaRePreTrainedModel(PreTrainedModel):
    config: LaReConfig
    config_class = LaReConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
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
        """Find the latent region `<|latent_start|> K*m x <|latent|> <|latent_end|>` and check it is aligned.

        The latent phase refocuses on the image, so the rows with an image carry the region (`LatentLayout.rows`)
        and text-only rows carry none: they are plain prompts (as with K=0), left-padded like the others, whose
        tokens in the region's columns go through the loop unchanged."""
        config = self.config
        starts = input_ids == config.latent_start_token_id
        ends = input_ids == config.latent_end_token_id
        slots = input_ids == config.latent_token_id
        rows = starts.any(dim=1)
        if not rows.any():
            if ends.any() or slots.any():
                raise ValueError(
                    "The input has <|latent|> or <|latent_end|> tokens but no <|latent_start|>. Build prompts with "
                    "LaReProcessor so the latent region is `<|latent_start|> <|latent|>... <|latent_end|>`."
                )
            return LatentLayout(start=None, num_steps=0)
        with_image = (input_ids == config.image_token_id).any(dim=1)
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
        if (starts.sum(dim=1)[rows] != 1).any() or (ends.sum(dim=1)[rows] != 1).any():
            raise ValueError("Each sequence must contain exactly one <|latent_start|> and one <|latent_end|>.")
        if (ends.any(dim=1) & ~rows).any() or (slots.any(dim=1) & ~rows).any():
            raise ValueError("<|latent|> or <|latent_end|> tokens appear in a row without <|latent_start|>.")
        start_cols = starts.int().argmax(dim=1)[rows]
        end_cols = ends.int().argmax(dim=1)[rows]
        if (start_cols != start_cols[0]).any() or (end_cols != end_cols[0]).any():
            raise ValueError(
                f"The latent regions are not aligned across the batch (<|latent_start|> at columns "
                f"{start_cols.tolist()}, <|latent_end|> at {end_cols.tolist()}). Left-pad the prompts "
                "(tokenizer.padding_side='left', as LaReProcessor does) so the latent slots share columns."
            )
        start, end = int(start_cols[0]), int(end_cols[0])
        num_slots = end - start - 1
        m = config.latent_tokens_per_step
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

    def _language_model_step(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.LongTensor,
        start: int,
        end: int,
        cache: Cache,
        recorder: SaliencyRecorder | None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Feed positions [start, end) on top of the cache, recording saliency for `recorder` on the language
        model's own attention backend; `kwargs` (output_attentions, ...) go to the language model."""
        if recorder is not None:
            kwargs["saliency_recorder"] = recorder
        with record_saliency(self.language_model, recorder):
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask[:, :end],
                position_ids=position_ids[..., start:end],
                use_cache=True,
                **cache_argument(cache),
                **kwargs,
            )

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

    def _window_features(
        self, saliency: torch.Tensor, image_features: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Sliding-window selection of V_s from V_T (Sec. 3.1); the whole grid when the window is ablated."""
        batch = image_features.shape[0]
        grid = self.config.patch_grid_size
        if not self.config.use_sliding_window:
            return torch.zeros(batch, 2, dtype=torch.long, device=image_features.device), image_features
        positions, token_indices = select_windows(saliency, grid, self.config.window_size, self.config.window_stride)
        index = token_indices.unsqueeze(-1).expand(-1, -1, image_features.shape[-1])
        return positions, image_features.gather(1, index)

    def _latents_for_step(
        self,
        last_hidden: torch.Tensor,
        window_features: torch.Tensor,
        history: torch.Tensor | None,
        embedding_scale: torch.Tensor,
        return_attention: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Z^(k) from the Extractor (Eq. 3-5), or the pooled window when the Extractor is ablated."""
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
        """The latent refocusing loop (Eq. 1-2), run by `forward()` for a fresh sequence (also the prefill step of
        `generate()`).

        1. Encode the prompt through `<|latent_start|>` once, with a KV cache, recording saliency.
        2. For k = 1..K: pick each sample's best window from the saliency, let the Extractor turn (H^(k), earlier
           latents, V_s) into Z^(k), write Z^(k) into its slots and (for k < K) feed only those m positions.
        3. Feed the rest (Z^(K), `<|latent_end|>`, a teacher-forced answer) in one pass.

        Rows without an image (`layout.rows` False) have no latent region: their tokens in the region's columns are
        fed as they are (in the same chunks, on the same cache, which gives what one pass gives), so they continue
        exactly as the prompt alone with K=0; the windows and latents the loop computes for them are discarded.

        Adaptive halting (Table 4; `latent_halting` = "cosine" | "l1" | "l2" with `latent_halting_threshold`): after
        each step k >= 2 a sample whose Z^(k) has converged to Z^(k-1) (`latent_steps_converged`) stops; Z^(k) is its
        last step. Its later slots are masked out of attention and the positions after them shift down by their
        number, so the sample continues exactly as a run with K = k slots would; once every sample has halted the
        remaining steps are not computed.

        `kwargs` (`output_attentions`, `output_hidden_states`, ...) go to every language-model call; the returned
        `hidden_states` / `attentions` cover every position, one entry per layer, as a single pass would.
        """
        check_latent_halting(latent_halting, latent_halting_threshold)
        if latent_halting is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            raise ValueError(
                "Adaptive halting (latent_halting) masks each halted sample's unused latent slots in a 2D "
                f"attention_mask [batch, length], got {type(attention_mask).__name__}. Pass the processor's 2D mask "
                "(and no static cache)."
            )
        batch, length, _ = inputs_embeds.shape
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        num_steps = layout.num_steps
        m = self.config.latent_tokens_per_step
        if num_steps == 0:  # one pass of the language model alone (packed sequences included: no mask, no cache)
            outputs = self._single_pass(inputs_embeds, attention_mask, position_ids, cache, use_cache, **kwargs)
            return self._merge_steps({"image_hidden_states": image_features}, [outputs], output_cache(outputs))
        own_cache = cache is None
        if own_cache:
            cache = DynamicCache(config=self.config.text_config)
        if image_features is None:
            raise ValueError(
                "Latent refocusing needs one image per prompt with a latent region (its <|image|> tokens and "
                "pixel_values); use num_latent_steps=0 for multi-image prompts."
            )
        rows = layout.rows.to(inputs_embeds.device) if layout.rows is not None else None
        every_row = rows is None or bool(rows.all())

        slots_start = layout.start + 1
        num_layers = self.config.text_config.num_hidden_layers
        track_saliency = self.config.window_loss_weight > 0 and self.training  # for the window-grounding loss
        recorder = SaliencyRecorder(image_positions, self.config.saliency_layers, num_layers, track_saliency)
        step_outputs = [
            self._language_model_step(
                inputs_embeds[:, :slots_start], attention_mask, position_ids, 0, slots_start, cache, recorder, **kwargs
            )
        ]
        embedding_scale = self.embedding_scale().to(inputs_embeds.dtype)
        latents, saliencies, windows, window_feats, attentions = [], [], [], [], []
        slots_end = slots_start + num_steps * m
        steps_used = torch.full((batch,), num_steps, dtype=torch.long, device=inputs_embeds.device)
        # text-only rows neither halt (their columns hold prompt tokens) nor count latent steps
        running = torch.ones(batch, dtype=torch.bool, device=inputs_embeds.device) if every_row else rows.clone()
        steps_used[~running] = 0
        halted_any = False
        for step in range(num_steps):
            saliency = recorder.saliency()
            positions, features = self._window_features(saliency, image_features)
            history = torch.cat(latents, dim=1) if latents else None
            step_latents, attention = self._latents_for_step(
                step_outputs[-1].last_hidden_state[:, -1],
                features,
                history,
                embedding_scale,
                return_extractor_attention,
            )
            step_latents = step_latents.to(inputs_embeds.dtype)
            if not every_row:  # rows without an image keep their own tokens in these columns
                slots = inputs_embeds[:, slots_start + step * m : slots_start + (step + 1) * m]
                step_latents = torch.where(rows[:, None, None], step_latents, slots)
                saliency = saliency * rows[:, None]
                positions = positions * rows[:, None]
            latents.append(step_latents)
            saliencies.append(saliency)
            windows.append(positions)
            window_feats.append(features)
            attentions.append(attention)
            if latent_halting is not None and step >= 1:
                halts = running & latent_steps_converged(
                    latents[-1], latents[-2], latent_halting, latent_halting_threshold
                )
                if halts.any():
                    if not halted_any:  # the caller's tensors are left as they were
                        position_ids = position_ids.expand(*position_ids.shape[:-2], batch, length).clone()
                        attention_mask, halted_any = attention_mask.clone(), True
                    steps_used[halts] = step + 1
                    running &= ~halts
                    attention_mask, position_ids = self._mask_unused_slots(
                        attention_mask, position_ids, halts, slots_start + (step + 1) * m, slots_end
                    )
                if not running.any():
                    break
            if step < num_steps - 1:
                start = slots_start + step * m
                recorder = SaliencyRecorder(image_positions, self.config.saliency_layers, num_layers, track_saliency)
                step_outputs.append(
                    self._language_model_step(
                        latents[-1], attention_mask, position_ids, start, start + m, cache, recorder, **kwargs
                    )
                )

        # the last computed step's latents, then (after an early stop: masked, unused slots) <|latent_end|> and the rest
        tail_start = slots_start + (len(latents) - 1) * m
        tail_embeds = torch.cat([latents[-1], inputs_embeds[:, tail_start + m :]], dim=1)
        step_outputs.append(
            self._language_model_step(
                tail_embeds, attention_mask, position_ids, tail_start, length, cache, None, **kwargs
            )
        )
        grid = self.config.patch_grid_size
        record = {
            "image_hidden_states": image_features,
            "latent_embeds": torch.stack(latents, dim=1),
            "saliency_maps": torch.stack(saliencies, dim=1).view(batch, len(latents), grid, grid),
            "window_positions": torch.stack(windows, dim=1),
            "window_features": torch.stack(window_feats, dim=1),
            "extractor_attentions": torch.stack(attentions, dim=1) if return_extractor_attention else None,
            "latent_rows": rows.long()
            if rows is not None
            else torch.ones(batch, dtype=torch.long, device=inputs_embeds.device),
            "latent_steps": steps_used,
        }
        if latent_halting is not None:
            record.update(halted_attention_mask=attention_mask, halted_position_ids=position_ids)
        if (
            own_cache
            and torch.is_grad_enabled()
            and (kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))
        ):
            # The per-layer outputs of the calls above are joined after the fact, so no later computation reads the
            # joined tensors and `retain_grad()` on them would see no gradient. With autograd on, the finished
            # sequence (prompt, latents, tail) is replayed in one pass instead: the same values (causal attention
            # over the same embeddings) and the same gradients, now through tensors the outputs depend on.
            final_embeds = torch.cat(
                [inputs_embeds[:, :slots_start], *latents, inputs_embeds[:, slots_start + len(latents) * m :]], dim=1
            )
            replay = self._single_pass(final_embeds, attention_mask, position_ids, None, use_cache, **kwargs)
            return self._merge_steps(record, [replay], output_cache(replay))
        return self._merge_steps(record, step_outputs, cache if use_cache else None)

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
        the cache of the result is None without `use_cache`."""
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_argument(cache),
            **kwargs,
        )
        if not use_cache:
            setattr(outputs, CACHE_ARGUMENT, None)
        return outputs

    @staticmethod
    def _mask_unused_slots(
        attention_mask: torch.Tensor,
        position_ids: torch.LongTensor,
        halts: torch.BoolTensor,
        unused_start: int,
        slots_end: int,
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Adaptive halting: mask the slots [unused_start, slots_end) of the halted rows out of attention and shift
        the positions after them down by the number of slots that were still attended, so the rest of the sequence
        sits where a run with fewer slots puts it (a slot already masked, e.g. when the caller passes back this
        mask, shifts nothing twice)."""
        removed = attention_mask[:, unused_start:slots_end].long().sum(-1) * halts.long()
        attention_mask[halts, unused_start:slots_end] = 0
        position_ids[..., slots_end:] -= removed.view(*([1] * (position_ids.dim() - 2)), -1, 1).to(position_ids.dtype)
        return attention_mask, position_ids

    @staticmethod
    def _merge_steps(
        record: dict[str, torch.Tensor | None], step_outputs: list[BaseModelOutputWithPast], cache: Cache | None
    ) -> LaReModelOutputWithPast:
        """Join the language-model calls of the loop along the sequence: last hidden state, per-layer hidden
        states, and per-layer attention maps (each call's keys padded to the longest with zeros, the weight a causal
        single pass gives to future positions)."""
        if len(step_outputs) == 1:  # one pass: its own tensors (a copy would cut them off the graph of the outputs)
            (outputs,) = step_outputs
            return LaReModelOutputWithPast(
                last_hidden_state=outputs.last_hidden_state,
                **cache_argument(cache),
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                **record,
            )
        hidden_states = attentions = None
        if step_outputs[0].hidden_states is not None:
            # layers left out of `output_hidden_states=[indices]` are None in every call
            hidden_states = tuple(
                torch.cat(layer_states, dim=1) if layer_states[0] is not None else None
                for layer_states in zip(*(outputs.hidden_states for outputs in step_outputs))
            )
        if step_outputs[0].attentions:
            merged = []
            for layer_maps in zip(*(outputs.attentions for outputs in step_outputs)):
                if layer_maps[0] is None:
                    merged.append(None)
                    continue
                key_length = max(attention.shape[-1] for attention in layer_maps)
                merged.append(
                    torch.cat([F.pad(attention, (0, key_length - attention.shape[-1])) for attention in layer_maps], 2)
                )
            attentions = tuple(merged)
        return LaReModelOutputWithPast(
            last_hidden_state=torch.cat([outputs.last_hidden_state for outputs in step_outputs], dim=1),
            **cache_argument(cache),
            hidden_states=hidden_states,
            attentions=attentions,
            **record,
        )

    @accepts_cache_argument
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
            self._check_continuation(placeholder_ids, pixel_values)
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            outputs = self._single_pass(
                inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, **kwargs
            )
            return self._merge_steps({}, [outputs], output_cache(outputs))

        if pixel_values is None:
            layout = LatentLayout(start=None, num_steps=0)
            self._warn_placeholders_without_pixels(placeholder_ids)
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
        """Types, shapes and ranges of the tensors given to `forward()`, checked against `input_ids` (or
        `inputs_embeds`) before anything runs, each error naming the argument, its value and the fix."""
        if input_ids is not None:
            check_tensor("input_ids", input_ids, dims=2, integer=True)
            check_token_ids("input_ids", input_ids, self.get_input_embeddings().weight.shape[0])
            batch, length = input_ids.shape
        else:
            check_tensor("inputs_embeds", inputs_embeds, dims=3, integer=False)
            batch, length = inputs_embeds.shape[:2]
        if isinstance(attention_mask, torch.Tensor):  # generate() with a static cache passes prebuilt mask dicts
            check_tensor("attention_mask", attention_mask, dims=(2, 4))
            expected = (batch, past_length + length)
            if attention_mask.dim() == 2 and tuple(attention_mask.shape) != expected:
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
        if past_length:
            return
        if pixel_values is not None:
            check_pixel_values(pixel_values, self.config.vision_config.image_size)
        text_config = self.config.get_text_config()
        max_positions = getattr(text_config, "max_position_embeddings", None)
        rope = getattr(text_config, "rope_parameters", None) or {}
        if max_positions and length > max_positions and rope.get("rope_type", "default") == "default":
            # RoPE still computes positions past the limit (and RoPE-scaling configs run there on purpose), so, as
            # transformers' decoders do, this runs; the quality past the trained context is the caller's call.
            logger.warning_once(
                f"The sequence has {length} positions (text, {self.config.image_seq_length} per image, and the "
                f"latent slots) but the language model was trained for at most max_position_embeddings="
                f"{max_positions}: positions past it are extrapolated. Shorten the prompt, use fewer latent steps "
                "(num_latent_steps), or a language model with a longer context (or RoPE scaling)."
            )

    def _warn_placeholders_without_pixels(self, placeholder_ids: torch.LongTensor) -> None:
        """Without pixel_values the input is read as text, as transformers' VLMs read it (LLaVA embeds its image
        token like any other): `<|image|>` and latent placeholders go through the language model as ordinary
        tokens and no latent phase runs. Said once, since a forgotten `pixel_values` is the usual cause."""
        config = self.config
        special = (config.image_token_id, config.latent_start_token_id, config.latent_token_id)
        if any(bool((placeholder_ids == token_id).any()) for token_id in special):
            logger.warning_once(
                "The input holds <|image|> or latent placeholders but no pixel_values: it is read as text (the "
                "placeholders embed as ordinary tokens) and no latent refocusing runs. Pass the processor's "
                "pixel_values to see the image and run the latent phase."
            )

    def _check_continuation(self, placeholder_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> None:
        """Positions fed on top of a filled cache are plain text: images and latent slots are encoded with the
        sequence's first pass (their pixel_values are then already in the cache and are not needed)."""
        config = self.config
        special = (config.image_token_id, config.latent_start_token_id, config.latent_token_id)
        found = [token_id for token_id in special if (placeholder_ids == token_id).any()]
        if found:
            raise ValueError(
                f"The positions fed on top of past_key_values contain image or latent placeholders (ids {found}); "
                "those are only encoded in a sequence's first pass. Pass the whole sequence without past_key_values."
            )


class LaReForConditionalGeneration(LaRePreTrainedModel, GenerationMixin):
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
        """Assemble a LaRe model from a pretrained vision encoder and a pretrained causal LM (Sec. 4.2 setup).

        `from_components(vision_dir, text_dir)` is enough: the LaRe special tokens are added to the LM's tokenizer
        (the same tokens, in the same order, as `LaReProcessor.from_components(vision_dir, text_dir)` adds, so the
        ids agree), the embeddings are resized to the tokenizer, the image normalisation is read from the vision
        encoder's `preprocessor_config.json`, and the generation config takes the LM's end-of-turn token.

        Args:
            vision: a vision model or its path / Hub id (a full CLIP/SigLIP checkpoint gives its vision tower).
            text: a causal LM, its path / Hub id (e.g. Qwen2.5-1.5B-Instruct), or a GGUF file (or a folder holding
                one), which is dequantised to a normal float checkpoint (needs the `gguf` package).
            special_token_ids: `image_token_id`, `latent_start_token_id`, `latent_token_id`, `latent_end_token_id`;
                None: add the tokens to `tokenizer` (or to the tokenizer saved with `text`) and use their ids.
            vocab_size: the tokenizer's length (None: the length of that tokenizer); the LM's embeddings are resized
                when they are smaller.
            image_tokenizer: a pretrained KL-16 `AutoencoderKL` (or its folder / Hub id) for the reconstructor;
                its config replaces `image_tokenizer_config` and its weights are copied (frozen).
            tokenizer: the tokenizer the model will be used with; the LaRe tokens are added to it in place.
            config_kwargs: any other `LaReConfig` field (num_latent_steps, window_size, use_reconstructor, ...).

        The projector, Extractor and reconstructor start from random initialisation (stage I/II train them).
        """
        if special_token_ids is None:
            if tokenizer is None:
                if isinstance(text, PreTrainedModel):
                    raise ValueError(
                        "from_components(text=<a loaded model>) cannot find the LM's tokenizer: pass tokenizer=... "
                        "(its tokenizer), special_token_ids=..., or text as a folder / Hub id / GGUF file."
                    )
                tokenizer = load_text_tokenizer(text)
            special_token_ids = add_lare_special_tokens(tokenizer)
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(tokenizer)
        missing = {"image_token_id", "latent_start_token_id", "latent_token_id", "latent_end_token_id"} - set(
            special_token_ids
        )
        if missing:
            raise ValueError(f"special_token_ids is missing {sorted(missing)}.")
        config_kwargs.setdefault(
            "components",
            {
                role: component_record(component)
                for role, component in (("vision", vision), ("text", text), ("image_tokenizer", image_tokenizer))
                if component is not None
            },
        )
        if not isinstance(vision, PreTrainedModel):
            if "image_mean" not in config_kwargs and "image_std" not in config_kwargs:
                config_kwargs.update(vision_image_normalization(vision))
            loaded_config = AutoConfig.from_pretrained(vision)
            vision_config = getattr(loaded_config, "vision_config", loaded_config)
            vision_class = type(AutoModel.from_config(vision_config))
            vision = vision_class.from_pretrained(vision, config=vision_config)
        if not isinstance(text, PreTrainedModel):
            text_path, text_kwargs = text_checkpoint(text)
            text = AutoModelForCausalLM.from_pretrained(text_path, **text_kwargs)
        if isinstance(image_tokenizer, (str, os.PathLike)):
            image_tokenizer = load_image_tokenizer(image_tokenizer)
        if image_tokenizer is not None:
            config_kwargs["image_tokenizer_config"] = {
                key: value for key, value in image_tokenizer.config.items() if not key.startswith("_")
            }
        vision_config = vision.config
        grid = vision_config.image_size // vision_config.patch_size
        config_kwargs.setdefault("image_seq_length", grid * grid)
        config = LaReConfig(
            vision_config=vision_config.to_dict(),
            text_config=text.config.to_dict(),
            **special_token_ids,
            **config_kwargs,
        )
        model = cls(config)
        model.model.vision_tower.load_state_dict(vision.state_dict())
        decoder = text.get_decoder()
        model.model.language_model.load_state_dict(decoder.state_dict())
        model.lm_head.load_state_dict(text.get_output_embeddings().state_dict())
        if image_tokenizer is not None and model.reconstructor is not None:
            model.reconstructor.image_tokenizer.load_state_dict(image_tokenizer.state_dict())
        if config.tie_word_embeddings:
            model.tie_weights()
        if vocab_size is not None and vocab_size > model.get_input_embeddings().weight.shape[0]:
            # resized here, not on `text`: a model passed in is left as it was
            model.resize_token_embeddings(vocab_size)
        model._set_generation_defaults(text.generation_config, tokenizer)
        return model

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

    @accepts_cache_argument
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
        prompt and the latent region), plus the semantic-augmentation losses (Eq. 6-10).

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
        if latent_halting is not None and (
            labels is not None or rationale_input_ids is not None or compute_latent_losses
        ):
            raise ValueError(
                f"latent_halting={latent_halting!r} is an inference option (generate() or a forward without labels): "
                "training runs every sample through all K latent steps. Drop latent_halting, or labels / rationale."
            )
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
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

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
        latent_losses = self.semantic_augmentation_losses(
            outputs, pixel_values, rationale_input_ids, rationale_attention_mask, compute_latent_losses
        )
        if window_targets is not None and self.config.window_loss_weight > 0 and compute_latent_losses is not False:
            latent_losses["window_loss"] = self.window_grounding_loss(outputs, window_targets)
        loss = self.weighted_loss(lm_loss, latent_losses)
        return LaReCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            **latent_losses,
            logits=logits,
            past_key_values=output_cache(outputs),
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
            check_token_ids("labels", labels, self.config.text_config.vocab_size, ignore_index=-100)
        if rationale_input_ids is not None:
            check_tensor("rationale_input_ids", rationale_input_ids, dims=2, integer=True)
            check_token_ids("rationale_input_ids", rationale_input_ids, self.config.text_config.vocab_size)
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

    def semantic_augmentation_losses(
        self,
        outputs: LaReModelOutputWithPast,
        pixel_values: torch.Tensor | None,
        rationale_input_ids: torch.LongTensor | None,
        rationale_attention_mask: torch.Tensor | None,
        compute: bool | None,
    ) -> dict[str, torch.Tensor]:
        """L_sym (Eq. 6), L_img (Eq. 7) and L_text (Eq. 8) for the latents of this forward; a term whose weight is
        0 is not computed.

        Each term is taken over the samples that have what it needs, and averaged over them (as if they were
        batched alone): L_img and the visual part of L_sym over the rows that ran the latent phase (an image),
        L_text and the text part of L_sym over those that also have a rationale (a row whose
        `rationale_attention_mask` is all 0 has none). A term with no such row is 0, still tied to the graph.
        """
        config = self.config
        if compute is False:
            return {}
        if compute is None and rationale_input_ids is None:
            if not self.training or outputs.latent_embeds is None:
                return {}
            # training without a rationale: no row has one, so L_text and L_Z<->T are 0 (tied to the graph) and the
            # terms that need only the image and the latents, L_img and L_Z<->V, train
            batch = outputs.last_hidden_state.shape[0]
            rationale_input_ids = torch.zeros(batch, 1, dtype=torch.long, device=outputs.last_hidden_state.device)
            rationale_attention_mask = torch.zeros_like(rationale_input_ids)
        rows = outputs.latent_rows.bool() if outputs.latent_rows is not None else None
        if rows is None and pixel_values is None:  # a text-only batch: no sample has what the latent losses need
            hidden = outputs.last_hidden_state
            rows = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        if rows is None:
            if compute:
                raise ValueError(
                    "Latent losses were asked for but the batch has no latent steps; build it with num_latent_steps "
                    "> 0 (stage I trains without latent losses)."
                )
            return {}
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

        # A term without a valid row: 0, connected to the graph and to the trainable parameters of the Extractor and
        # of its head, so that backward works in any stage and DDP sees those parameters used on every step.
        def zero(head: nn.Module | None = None) -> torch.Tensor:
            tensors = [outputs.last_hidden_state] + [
                parameter
                for module in (self.model.extractor, head)
                if module is not None
                for parameter in module.parameters()
                if parameter.requires_grad
            ]
            return torch.stack([(tensor.float() * 0).sum() for tensor in tensors]).sum()

        losses: dict[str, torch.Tensor] = {}
        if config.sym_loss_weight > 0:
            text_part, visual_part = self._alignment(
                outputs, rows, text_rows, rationale_input_ids, rationale_attention_mask
            )
            # tied to the head and the Extractor also where a part has rows only on other ranks (DDP sees them used)
            tie = zero(self.alignment_head)
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
                losses["text_reconstruction_loss"] = zero()
        if config.image_loss_weight > 0:
            if self.reconstructor is None:
                if compute:
                    raise ValueError(
                        "image_loss_weight > 0 but this checkpoint has no reconstructor (use_reconstructor=False); "
                        "set image_loss_weight=0 or build the model with use_reconstructor=True."
                    )
            elif rows.any():
                _, num_steps, m, hidden = outputs.latent_embeds.shape
                window_size = config.effective_window_size
                positions = outputs.window_positions[rows].reshape(-1, 2)
                crops = self.reconstructor.crop_windows(
                    pixel_values.repeat_interleave(num_steps, dim=0), positions, window_size
                )
                losses["image_reconstruction_loss"] = self.reconstructor(
                    outputs.latent_embeds[rows].reshape(-1, m, hidden), crops
                )
            else:
                losses["image_reconstruction_loss"] = zero(self.reconstructor)
        return losses

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

    def _alignment(
        self,
        outputs: LaReModelOutputWithPast,
        rows: torch.BoolTensor,
        text_rows: torch.BoolTensor,
        rationale_input_ids: torch.LongTensor | None,
        rationale_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Eq. 6 as `(L_Z<->T over text_rows, L_Z<->V over rows)` on mean-max pooled latents, window features and
        (for the text part) the LM's hidden states of the rationales; a part without rows is None.

        Under `torch.distributed` every rank joins both parts' gathers on every step, with 0 rows when it has none
        (a text-only batch, no rationale), so that the collectives of all ranks stay in step."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        tau = self.alignment_head.temperature
        # 0 rows still tied to the graph: every rank must also run the gathers' backward (all-to-all) in step.
        empty = outputs.last_hidden_state[:0, 0].float().repeat(1, 2)
        pooled_latents, pooled_visual = empty, empty
        if rows.any():
            pooled_latents = mean_max_pool(self._flat_latents(outputs, rows))
            window_features = outputs.window_features[rows]
            pooled_visual = mean_max_pool(
                window_features.reshape(window_features.shape[0], -1, window_features.shape[-1])
            )
        visual_part = text_part = None
        if rows.any() or distributed:
            visual_part = symmetric_info_nce(pooled_latents, pooled_visual, tau)
        if rationale_input_ids is None or not (text_rows.any() or distributed):
            return text_part, visual_part
        pooled_text, text_latents = empty, empty
        if text_rows.any():
            ids, mask = rationale_input_ids[text_rows], rationale_attention_mask[text_rows]
            rationale_hidden = self.model.language_model(
                input_ids=ids, attention_mask=mask, use_cache=False
            ).last_hidden_state
            pooled_text = mean_max_pool(rationale_hidden, mask)
            text_latents = pooled_latents[text_rows[rows]]
        text_part = symmetric_info_nce(text_latents, pooled_text, tau)
        return text_part, visual_part

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

    def weighted_loss(
        self, lm_loss: torch.Tensor | None, latent_losses: dict[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """Eq. 10: L = L_ntp + l_sym L_sym + l_img L_img + l_text L_text over the terms that were computed."""
        weights = {
            "alignment_loss": self.config.sym_loss_weight,
            "image_reconstruction_loss": self.config.image_loss_weight,
            "text_reconstruction_loss": self.config.text_loss_weight,
            "window_loss": self.config.window_loss_weight,
        }
        terms = [] if lm_loss is None else [lm_loss]
        terms += [weights[name] * value for name, value in latent_losses.items() if name in weights]
        return torch.stack(terms).sum() if terms else None

    def set_latent_steps(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, num_latent_steps: int | None
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Rewrite the latent region of each prompt with an image to `num_latent_steps` x m slots (K=0 removes it;
        None keeps its K) and remove any region from text-only prompts (the latent phase needs an image); rows
        whose length changed are left-padded again so the regions share columns. Unchanged tensors come back when
        nothing is rewritten."""
        config = self.config
        if num_latent_steps is not None:
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
        starts = input_ids == config.latent_start_token_id
        ends = input_ids == config.latent_end_token_id
        with_region = starts.any(dim=1)
        with_image = (input_ids == config.image_token_id).any(dim=1)
        if num_latent_steps and (with_image & ~with_region).any():
            raise ValueError(
                f"num_latent_steps={num_latent_steps} was asked for but the prompt has no latent markers. Build it "
                "with LaReProcessor / apply_chat_template(add_generation_prompt=True), which ends the prompt with "
                "`<|latent_start|><|latent|>...<|latent_end|>`."
            )
        start_cols, end_cols = starts.int().argmax(dim=1), ends.int().argmax(dim=1)
        malformed = (starts.sum(dim=1) != 1) | (ends.sum(dim=1) != 1) | (end_cols <= start_cols)
        if (malformed & with_region).any():
            raise ValueError(
                "Each sequence must contain exactly one <|latent_start|> and one <|latent_end|> after it; build "
                "prompts with LaReProcessor / apply_chat_template(add_generation_prompt=True)."
            )
        m = config.latent_tokens_per_step
        region_steps = (end_cols - start_cols - 1) // m
        target = region_steps if num_latent_steps is None else torch.full_like(region_steps, num_latent_steps)
        target = torch.where(with_image, target, 0)
        rewrite = with_region & (~with_image | (region_steps != target))
        if not rewrite.any():
            return input_ids, attention_mask
        rows_ids, rows_mask = [], []
        for row in range(input_ids.shape[0]):
            ids, mask = input_ids[row], attention_mask[row]
            if rewrite[row]:
                start, end = int(start_cols[row]), int(end_cols[row])
                steps = int(target[row])
                region = ids.new_tensor(
                    [config.latent_start_token_id]
                    + [config.latent_token_id] * steps * m
                    + [config.latent_end_token_id]
                    if steps
                    else []
                )
                ids = torch.cat([ids[:start], region, ids[end + 1 :]])
                mask = torch.cat([mask[:start], mask.new_ones(region.shape), mask[end + 1 :]])
            first = int(mask.nonzero()[0]) if mask.any() else mask.shape[0]
            rows_ids.append(ids[first:])
            rows_mask.append(mask[first:])
        length = max(ids.shape[0] for ids in rows_ids)
        pad = self.generation_config.pad_token_id if self.generation_config is not None else None
        pad = pad if isinstance(pad, int) else 0
        new_ids = input_ids.new_full((len(rows_ids), length), pad)
        new_mask = attention_mask.new_zeros((len(rows_ids), length))
        for row, (ids, mask) in enumerate(zip(rows_ids, rows_mask)):
            new_ids[row, length - ids.shape[0] :] = ids
            new_mask[row, length - mask.shape[0] :] = mask
        return new_ids, new_mask

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
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        # LaRe's outputs carry the cache as `past_key_values`; GenerationMixin reads it under the installed name
        if outputs.past_key_values is not None:
            model_kwargs.update(cache_argument(outputs.past_key_values))
        return model_kwargs

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
        if latent_halting is not None:
            if given_cache(kwargs) is not None:
                raise ValueError(
                    "latent_halting cannot be combined with past_key_values: the latent phase is run by the prefill of a "
                    "fresh prompt. Drop past_key_values."
                )
            cache_implementation = getattr(kwargs.get("generation_config"), "cache_implementation", None)
            cache_implementation = kwargs.get("cache_implementation", cache_implementation)
            if cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"latent_halting needs the default dynamic cache, got cache_implementation={cache_implementation!r}: "
                    "a static cache's prebuilt masks cannot drop the latent slots a sample no longer uses."
                )
            kwargs.update(latent_halting=latent_halting, latent_halting_threshold=latent_halting_threshold)
        for name in UNSUPPORTED_GENERATION_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"`{name}` (assisted / prompt-lookup decoding) is not supported by LaRe: the draft tokens would "
                    "be checked against a cache holding latent embeddings, which gives wrong text."
                )
        generation_config = kwargs.get("generation_config")
        if generation_config is not None and getattr(generation_config, "prompt_lookup_num_tokens", None):
            raise ValueError("Prompt-lookup decoding is not supported by LaRe (latent-filled cache).")
        prompt_ids = input_ids
        if num_latent_steps is not None:
            if input_ids is None:
                raise ValueError(
                    "num_latent_steps rewrites the latent slots of input_ids, but no input_ids were given. With "
                    "inputs_embeds, build the prompt with the wanted K instead (LaReProcessor(num_latent_steps=K))."
                )
            if given_cache(kwargs) is not None:
                raise ValueError(
                    "num_latent_steps cannot be combined with past_key_values: the cache already holds the prompt's "
                    "latent region. Continue without num_latent_steps, or drop past_key_values."
                )
        if input_ids is not None and input_ids.shape[1] > 0 and given_cache(kwargs) is None:
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
