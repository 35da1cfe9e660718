"""Builders of a LaRe model from pretrained parts (Sec. 4.2 setup): `from_components(vision, text)`, and from a
whole LLaVA checkpoint: `from_llava(llava)`.

They sit next to `components.py` (loading and describing the parts); `LaReForConditionalGeneration.from_components`
delegates here.
"""

from __future__ import annotations

import os

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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

# The LLaVA config fields a conversion carries over (the copied weights are trained for them).
LLAVA_CARRIED_FIELDS = (
    "image_seq_length",
    "projector_hidden_act",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "multimodal_projector_bias",
    "tie_word_embeddings",
)

# LLaVA-family checkpoints that are not plain LLaVA, and why a conversion would not be faithful.
UNSUPPORTED_LLAVA_TYPES = {
    "llava_next": "LLaVA-NeXT tiles each image into several crops (anyres) and adds newline tokens between rows, so "
    "an image is not one square patch grid",
    "llava_onevision": "LLaVA-OneVision tiles each image into several crops (anyres) and handles video, so an image "
    "is not one square patch grid",
    "llava_next_video": "LLaVA-NeXT-Video tiles images into several crops and pools video frames, so an image is not "
    "one square patch grid",
    "video_llava": "Video-LLaVA encodes videos with a separate video tower; LaRe refocuses on one image",
    "vipllava": "VipLLaVA reads several vision layers through its own projector (layer norm first), which LaRe's "
    "LLaVA projector does not reproduce",
}


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

    The projector, Extractor and reconstructor start from random initialisation (stage I/II train them). A vision
    tower without a CLS token (SigLIP) gets `vision_feature_select_strategy="full"` (every patch of the grid).
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
    if not any(name.endswith("class_embedding") for name, _ in vision.named_parameters()):
        # no CLS token (SigLIP): "default" would drop a real patch; "full" keeps the whole grid
        config_kwargs.setdefault("vision_feature_select_strategy", "full")
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
    return vision, text, _load_image_tokenizer(image_tokenizer, config_kwargs)


def _load_image_tokenizer(image_tokenizer: str | nn.Module | None, config_kwargs: dict) -> nn.Module | None:
    """The image tokenizer given as a folder / Hub id is loaded; its config goes into `config_kwargs`."""
    if isinstance(image_tokenizer, (str, os.PathLike)):
        image_tokenizer = load_image_tokenizer(image_tokenizer)
    if image_tokenizer is not None:
        config_kwargs["image_tokenizer_config"] = {
            key: value for key, value in image_tokenizer.config.items() if not key.startswith("_")
        }
    return image_tokenizer


def from_llava(
    model_class: type[PreTrainedModel],
    llava: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_tokenizer: str | nn.Module | None = None,
    **config_kwargs,
) -> PreTrainedModel:
    """Convert a transformers `LlavaForConditionalGeneration` checkpoint (e.g. llava-hf/llava-1.5-7b-hf) into LaRe.

    The vision tower, the projector, the language model, its embeddings and the LM head are copied; LLaVA's
    `vision_feature_layer`, `vision_feature_select_strategy`, `projector_hidden_act`, `multimodal_projector_bias`,
    `image_seq_length` and image token carry over. The latent tokens `<|latent_start|>`, `<|latent|>`,
    `<|latent_end|>` are added to the tokenizer (in place); only their embedding rows (when the table must grow),
    the Extractor, the alignment head and the reconstructor are newly initialised. With K=0 the converted model
    computes exactly what the LLaVA model computes. A converted LLaVA-1.5 has done stage I (the projector is
    trained): start at stage II.

    Args:
        model_class: the LaRe class to build (`LaReForConditionalGeneration`).
        llava: a `LlavaForConditionalGeneration` or its folder / Hub id.
        tokenizer: the checkpoint's tokenizer (needed when `llava` is a loaded model; loaded from the folder
            otherwise). Pass the same tokenizer object to `LaReProcessor.from_llava(..., tokenizer=...)` or save it.
        image_tokenizer: a pretrained KL-16 `AutoencoderKL` (or its folder / Hub id) for the reconstructor.
        config_kwargs: any other `LaReConfig` field. The Extractor is the paper's (1536 wide, 12 heads) unless
            `extractor_hidden_size` is given; `image_mean` / `image_std` default to the checkpoint's image
            processor's when it is a folder.

    Raises:
        ValueError: for a checkpoint that is not plain LLaVA (LLaVA-NeXT / OneVision tiling, video), naming why.
    """
    source = llava
    llava, tokenizer = _load_llava(llava, tokenizer, config_kwargs)
    llava_config = llava.config
    image_token = tokenizer.convert_ids_to_tokens(llava_config.image_token_id)
    special_token_ids = add_lare_special_tokens(tokenizer, image_token=image_token)
    config_kwargs.setdefault("extractor_hidden_size", PAPER_EXTRACTOR_HIDDEN_SIZE)
    config_kwargs.setdefault("components", {"llava": component_record(source)})
    image_tokenizer = _load_image_tokenizer(image_tokenizer, config_kwargs)
    carried = {name: getattr(llava_config, name) for name in LLAVA_CARRIED_FIELDS}
    clash = sorted(set(carried) & set(config_kwargs))
    if clash:
        raise ValueError(
            f"from_llava takes {', '.join(clash)} from the LLaVA checkpoint (its weights are trained for them); "
            "leave them out of the arguments."
        )
    config = LaReConfig(
        vision_config=llava_config.vision_config.to_dict(),
        text_config=llava_config.text_config.to_dict(),
        **special_token_ids,
        **carried,
        **config_kwargs,
    )
    model = model_class(config)
    for name in ("vision_tower", "multi_modal_projector", "language_model"):
        getattr(model.model, name).load_state_dict(getattr(llava.model, name).state_dict())
    model.lm_head.load_state_dict(llava.lm_head.state_dict())
    if image_tokenizer is not None and model.reconstructor is not None:
        model.reconstructor.image_tokenizer.load_state_dict(image_tokenizer.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # new rows: the added latent tokens only
    model._set_generation_defaults(llava.generation_config, tokenizer)
    return model


def _load_llava(
    llava: str | os.PathLike | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, config_kwargs: dict
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The LLaVA model and its tokenizer, checked to be plain LLaVA; from a folder / Hub id, its image processor's
    normalisation goes into `config_kwargs` (unless set there)."""
    if isinstance(llava, PreTrainedModel):
        check_llava_config(llava.config, type(llava).__name__)
        if tokenizer is None:
            raise ValueError(
                "from_llava(<a loaded model>) cannot find its tokenizer: pass tokenizer=... (the checkpoint's), or "
                "pass the checkpoint's folder / Hub id."
            )
        return llava, tokenizer
    check_llava_config(AutoConfig.from_pretrained(llava), str(llava))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(llava)
    if "image_mean" not in config_kwargs and "image_std" not in config_kwargs:
        config_kwargs.update(_llava_image_normalization(llava))
    return LlavaForConditionalGeneration.from_pretrained(llava), tokenizer


def check_llava_config(config, where: str) -> None:
    """Refuse a checkpoint that is not a plain LLaVA one, saying what it is and why it cannot be converted."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llava":
        return
    reason = UNSUPPORTED_LLAVA_TYPES.get(
        model_type, "from_llava converts transformers' LlavaForConditionalGeneration checkpoints only"
    )
    raise ValueError(
        f"{where} is a {model_type!r} checkpoint, which cannot be converted to LaRe: {reason}. LaRe's latent "
        "refocusing slides a window over the single square patch grid of one image (Eq. 1-2). Convert a plain "
        "LLaVA checkpoint (model_type 'llava'), or assemble a model from its parts with from_components."
    )


def _llava_image_normalization(llava: str | os.PathLike) -> dict[str, list[float]]:
    """`image_mean` / `image_std` of a LLaVA checkpoint's image processor (none when it has no image processor)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        values, _ = ImageProcessingMixin.get_image_processor_dict(str(llava))
    except OSError:
        return {}
    if "image_mean" not in values or "image_std" not in values:
        return {}
    return {"image_mean": list(values["image_mean"]), "image_std": list(values["image_std"])}


__all__ = ["PAPER_EXTRACTOR_HIDDEN_SIZE", "check_llava_config", "from_components", "from_llava"]
