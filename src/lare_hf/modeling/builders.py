"""Builders of a LaRe model from pretrained parts (Sec. 4.2 setup): `from_components(vision, text)`.

They sit next to `components.py` (loading and describing the parts); `LaReForConditionalGeneration.from_components`
delegates here.
"""

from __future__ import annotations

import os

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .components import (
    add_lare_special_tokens,
    component_record,
    load_text_tokenizer,
    text_checkpoint,
    vision_image_normalization,
)
from .configuration_lare import LaReConfig
from .reconstruction import load_image_tokenizer

# Appendix B: the Extractor is "uniformly set to 1536" wide with 12 heads for every backbone, projected from and
# back to the LM width; the builders use it unless the caller sets `extractor_hidden_size`.
PAPER_EXTRACTOR_HIDDEN_SIZE = 1536


def from_components(
    model_class: type[PreTrainedModel],
    vision: str | os.PathLike | PreTrainedModel,
    text: str | os.PathLike | PreTrainedModel,
    special_token_ids: dict[str, int] | None = None,
    vocab_size: int | None = None,
    image_tokenizer: str | nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config_kwargs,
) -> PreTrainedModel:
    """Assemble a LaRe model from a pretrained vision encoder and a pretrained causal LM (Sec. 4.2 setup).

    `from_components(vision_dir, text_dir)` is enough: the LaRe special tokens are added to the LM's tokenizer
    (the same tokens, in the same order, as `LaReProcessor.from_components(vision_dir, text_dir)` adds, so the
    ids agree), the embeddings are resized to the tokenizer, the image normalisation is read from the vision
    encoder's `preprocessor_config.json`, and the generation config takes the LM's end-of-turn token.

    Args:
        model_class: the LaRe class to build (`LaReForConditionalGeneration`).
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
        config_kwargs: any other `LaReConfig` field (num_latent_steps, window_size, use_reconstructor, ...). The
            Extractor is the paper's (Appendix B: 1536 wide, 12 heads, projected in and out of the LM width) unless
            `extractor_hidden_size` is given (None: the LM width).

    The projector, Extractor and reconstructor start from random initialisation (stage I/II train them).
    """
    config_kwargs.setdefault("extractor_hidden_size", PAPER_EXTRACTOR_HIDDEN_SIZE)
    special_token_ids, tokenizer = _special_token_ids(text, special_token_ids, tokenizer)
    if vocab_size is None and tokenizer is not None:
        vocab_size = len(tokenizer)
    config_kwargs.setdefault(
        "components",
        {
            role: component_record(component)
            for role, component in (("vision", vision), ("text", text), ("image_tokenizer", image_tokenizer))
            if component is not None
        },
    )
    vision, text, image_tokenizer = _load_components(vision, text, image_tokenizer, config_kwargs)
    vision_config = vision.config
    grid = vision_config.image_size // vision_config.patch_size
    config_kwargs.setdefault("image_seq_length", grid * grid)
    config = LaReConfig(
        vision_config=vision_config.to_dict(),
        text_config=text.config.to_dict(),
        **special_token_ids,
        **config_kwargs,
    )
    model = model_class(config)
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


def _special_token_ids(
    text: str | os.PathLike | PreTrainedModel,
    special_token_ids: dict[str, int] | None,
    tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[dict[str, int], PreTrainedTokenizerBase | None]:
    """The ids of the four LaRe tokens: given, or added to `tokenizer` (or to the tokenizer saved with `text`)."""
    if special_token_ids is None:
        if tokenizer is None:
            if isinstance(text, PreTrainedModel):
                raise ValueError(
                    "from_components(text=<a loaded model>) cannot find the LM's tokenizer: pass tokenizer=... "
                    "(its tokenizer), special_token_ids=..., or text as a folder / Hub id / GGUF file."
                )
            tokenizer = load_text_tokenizer(text)
        special_token_ids = add_lare_special_tokens(tokenizer)
    missing = {"image_token_id", "latent_start_token_id", "latent_token_id", "latent_end_token_id"} - set(
        special_token_ids
    )
    if missing:
        raise ValueError(f"special_token_ids is missing {sorted(missing)}.")
    return special_token_ids, tokenizer


def _load_components(
    vision: str | os.PathLike | PreTrainedModel,
    text: str | os.PathLike | PreTrainedModel,
    image_tokenizer: str | nn.Module | None,
    config_kwargs: dict,
) -> tuple[PreTrainedModel, PreTrainedModel, nn.Module | None]:
    """Load the parts given as paths / Hub ids; the vision encoder's image normalisation and the image tokenizer's
    config go into `config_kwargs` (unless set there)."""
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
    return vision, text, image_tokenizer


__all__ = ["PAPER_EXTRACTOR_HIDDEN_SIZE", "from_components"]
