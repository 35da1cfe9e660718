"""PyTorch LaRe model: a LLaVA-shaped VLM that reasons through latent refocusing (Sec. 3.1, Appendix B)."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable

import torch
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
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import select_hidden_states

from .builders import from_components, from_llava
from .cache_naming import accepts_cache_argument, cached_length, output_cache
from .checkpointing import checkpoint_through_cache
from .configuration_lare import LaReConfig
from .extractor import LaReExtractor
from .generation import LaReGenerationHooksMixin
from .latent_loop import LaReLatentRefocusMixin
from .latent_losses import LaReLatentLossesMixin
from .latent_region import LatentLayout, latent_layout, placeholder_ids_from_embeds, rewrite_latent_steps
from .losses import LaReAlignmentHead
from .model_card import write_model_card
from .outputs import LaReCausalLMOutputWithPast, LaReModelOutputWithPast
from .reconstruction import LaReImageReconstructor
from .synchronised_calls import PHANTOM_BATCH_KEYS, LaReSynchronisedCallsMixin, remove_phantom_row
from .validation import (
    check_continuation,
    check_forward_kwargs,
    check_halting_not_in_training,
    check_model_inputs,
    check_training_inputs,
    warn_placeholders_without_pixels,
)


class LaReMultiModalProjector(nn.Module):
    """2-layer MLP mapping vision features to the LM hidden size: V_T (Sec. 3.1). Its input is the vision width
    times the number of `vision_feature_layer`s (their features are concatenated, as in LLaVA)."""

    def __init__(self, config: LaReConfig):
        super().__init__()
        self.linear_1 = nn.Linear(
            config.vision_config.hidden_size * len(config.vision_feature_layers),
            config.text_config.hidden_size,
            bias=config.multimodal_projector_bias,
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
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Attention-only LM (no recurrent state): transformers' newer generation tests read this flag to decide whether
    # padding-free (packed) inputs apply; PreTrainedModel 5.23-5.25 does not define it.
    _is_stateful = False
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The decode step (a forward on a filled cache) compiles without graph breaks, so generate() with a static cache
    # runs it compiled as for any transformers LM; the prefill, which runs the latent loop, stays eager.
    _can_compile_fullgraph = True

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


class LaReModel(LaReLatentRefocusMixin, LaRePreTrainedModel):
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
        `hidden_states[vision_feature_layer]`, so the encoder layers after it (after the deepest one, for a list)
        and the tower's own output heads (`post_layernorm`, a pooling `head`) are never reached (LLaVA keeps them
        the same way)."""
        num_layers = self.config.vision_config.num_hidden_layers
        # hidden_states[j] = after j layers
        layers_used = max(layer % (num_layers + 1) for layer in self.config.vision_feature_layers)
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
        """Vision tower outputs with `pooler_output` = the features of `vision_feature_layer` (a list: concatenated),
        the first token dropped with `vision_feature_select_strategy="default"` (LLaVA's selection), projected: V_T
        `[images, image_seq_length, D]` (as transformers' VLMs return them). `kwargs` go to the vision tower
        (`output_attentions`, `output_hidden_states`: by default only the feature layers are captured)."""
        image_size = self.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, image_size, image_size):
            raise ValueError(
                f"pixel_values must have shape [num_images, 3, {image_size}, {image_size}] for this model, got "
                f"{tuple(pixel_values.shape)}. Preprocess images with the model's LaReProcessor."
            )
        kwargs.pop("return_dict", None)
        vision_dtype = self.vision_tower.dtype
        outputs = self.vision_tower(pixel_values.to(vision_dtype), return_dict=True, **kwargs)
        first = 1 if self.config.vision_feature_select_strategy == "default" else 0  # "default" drops CLS
        features = torch.cat(
            [outputs.hidden_states[layer][:, first:] for layer in self.config.vision_feature_layers], dim=-1
        )
        if features.shape[1] != self.config.image_seq_length:
            raise ValueError(
                f"The vision tower gives {features.shape[1]} feature tokens per image with "
                f"vision_feature_select_strategy={self.config.vision_feature_select_strategy!r}, but the config's "
                f"image_seq_length is {self.config.image_seq_length}; set image_seq_length={features.shape[1]} (and "
                "the processor's) or change the strategy."
            )
        outputs.pooler_output = self.multi_modal_projector(features)
        return outputs

    def get_placeholder_ids(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """Token ids of the `<|image|>` and latent-region placeholders in `inputs_embeds`, -1 elsewhere (see
        `latent_region.placeholder_ids_from_embeds`)."""
        return placeholder_ids_from_embeds(inputs_embeds, self.get_input_embeddings(), self.config)

    def latent_layout(self, input_ids: torch.LongTensor) -> LatentLayout:
        """The latent region of `input_ids`, checked (see `latent_region.latent_layout`)."""
        return latent_layout(input_ids, self.config)

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        image_outputs: BaseModelOutputWithPooling | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]:
        """Token embeddings (`inputs_embeds` when given, `input_ids` then only locating the placeholders) with the
        visual tokens scattered into the `<|image|>` positions (`image_outputs.pooler_output` when the caller has
        already run `get_image_features` on `pixel_values`).

        Returns the embeddings, V_T on the patch grid per sample `[batch, grid * grid, D]` and the columns of those
        image tokens `[batch, grid * grid]`, when every sample has one image or none (a row without one gets zero
        features and the placeholder columns 0..tokens-1); None, None otherwise (no image, or several in a sample).
        A CLS token kept by `vision_feature_select_strategy="full"` is embedded but is not on the grid, so it is
        left out of both (`config.image_grid_offset`).
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
        if image_outputs is None:
            image_outputs = self.get_image_features(pixel_values)
        image_features = image_outputs.pooler_output.to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(
            image_mask.unsqueeze(-1), image_features.reshape(-1, image_features.shape[-1])
        )
        per_row = image_mask.sum(dim=1)
        batch, offset = input_ids.shape[0], self.config.image_grid_offset
        if (per_row == seq_len).all():
            image_positions = image_mask.nonzero()[:, 1].view(batch, seq_len)
            return inputs_embeds, image_features.view(batch, seq_len, -1)[:, offset:], image_positions[:, offset:]
        if ((per_row == seq_len) | (per_row == 0)).all():  # image rows and text-only rows
            rows = (per_row == seq_len)[:, None, None]
            hidden = image_features.shape[-1]
            features = image_features.new_zeros(batch, seq_len, hidden).masked_scatter(
                rows.expand(-1, seq_len, hidden), image_features.reshape(-1, hidden)
            )
            image_positions = torch.arange(seq_len, device=input_ids.device).repeat(batch, 1)
            image_positions[rows[:, 0, 0]] = image_mask.nonzero()[:, 1].view(-1, seq_len)
            return inputs_embeds, features[:, offset:], image_positions[:, offset:]
        return inputs_embeds, None, None

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
        filled cache (decoding) the new positions go through the language model on top of it. While `torch.compile`
        traces a call on a static cache (generate()'s compiled decode step) the cache's length is a tensor, so there a
        call without `pixel_values` continues the cache and the checks that read tensor values are skipped.

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
        past_length = cached_length(past_key_values)
        # While torch.compile traces a static cache's decode step its length is not readable (see `cached_length`);
        # the calls generate() compiles are its decode steps, which get no pixel_values.
        continues_cache = past_length > 0 if past_length is not None else pixel_values is None
        self.check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, pixel_values, past_length)
        text_config = self.config.get_text_config()
        use_cache = use_cache if use_cache is not None else getattr(text_config, "use_cache", True)
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        kwargs.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        placeholder_ids = input_ids if input_ids is not None else self.get_placeholder_ids(inputs_embeds)

        if continues_cache:
            check_continuation(self.config, placeholder_ids)
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            outputs = self._single_pass(
                inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, **kwargs
            )
            return self._merge_lm_calls({}, [outputs], output_cache(outputs))

        if pixel_values is None:
            layout = LatentLayout(start=None, num_steps=0)
            warn_placeholders_without_pixels(self.config, placeholder_ids)
        else:
            layout = self.latent_layout(placeholder_ids)
        if attention_mask is None and layout.num_steps:
            attention_mask = torch.ones(placeholder_ids.shape, dtype=torch.long, device=placeholder_ids.device)
        image_outputs = None
        if pixel_values is not None:  # the vision tower's output is returned as transformers' VLMs return it
            vision_kwargs = {"output_attentions": True} if output_attentions else {}
            image_outputs = self.get_image_features(pixel_values, **vision_kwargs)
        inputs_embeds, image_features, image_positions = self.embed_multimodal(
            placeholder_ids, pixel_values, inputs_embeds, image_outputs
        )
        outputs = self.latent_refocus(
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
        if image_outputs is not None:
            outputs["image_outputs"] = image_outputs  # item assignment keeps it in `keys()` / `to_tuple()`
        return outputs

    def check_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        past_length: int | None = 0,
    ) -> None:
        """The checks `forward()` runs on its inputs before anything is computed (see
        `validation.check_model_inputs`)."""
        vocab_size = self.get_input_embeddings().weight.shape[0]
        check_model_inputs(
            self.config, vocab_size, input_ids, inputs_embeds, attention_mask, position_ids, pixel_values, past_length
        )


class LaReForConditionalGeneration(
    LaReLatentLossesMixin, LaReSynchronisedCallsMixin, LaReGenerationHooksMixin, LaRePreTrainedModel, GenerationMixin
):
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

    @classmethod
    def from_llava(
        cls,
        llava: str | os.PathLike | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        image_tokenizer: str | nn.Module | None = None,
        **config_kwargs,
    ) -> LaReForConditionalGeneration:
        """Convert a transformers `LlavaForConditionalGeneration` checkpoint into LaRe (vision tower, projector, LM
        and embeddings copied; at K=0 it computes what LLaVA computes); see `builders.from_llava`."""
        return from_llava(cls, llava, tokenizer=tokenizer, image_tokenizer=image_tokenizer, **config_kwargs)

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
        phantom = None
        if self.training and past_key_values is None:
            batch = dict(zip(PHANTOM_BATCH_KEYS, (input_ids, attention_mask, pixel_values, labels)))
            batch.update(rationale_input_ids=rationale_input_ids, rationale_attention_mask=rationale_attention_mask)
            batch["window_targets"] = window_targets
            phantom = self.synchronise_module_calls(batch, inputs_embeds, position_ids)
            if phantom is not None:  # this rank's batch with a phantom image row appended
                input_ids, attention_mask, pixel_values, labels = (batch[key] for key in PHANTOM_BATCH_KEYS[:4])
                rationale_input_ids, rationale_attention_mask, window_targets = (
                    batch[key] for key in PHANTOM_BATCH_KEYS[4:]
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
        if phantom is not None and outputs.latent_rows is not None:
            outputs.latent_rows = outputs.latent_rows.clone()
            outputs.latent_rows[phantom.batch :] = 0  # left out of every loss, as a text-only row
        latent_losses = self.latent_losses(
            outputs, pixel_values, rationale_input_ids, rationale_attention_mask, window_targets,
            compute_latent_losses, input_ids, attention_mask,
        )  # fmt: skip
        loss = self.weighted_loss(lm_loss, latent_losses)
        if self.training and past_key_values is None:
            self.image_loss_draws += 1  # the next training forward draws new L_img noise
        result = LaReCausalLMOutputWithPast(
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
            image_outputs=outputs.image_outputs,
        )
        return remove_phantom_row(result, phantom) if phantom is not None else result

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


__all__ = ["LaRePreTrainedModel", "LaReModel", "LaReForConditionalGeneration"]
