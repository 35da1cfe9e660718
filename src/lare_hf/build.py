"""Build LaRe checkpoints: from a preset in `configs/`, or from pretrained parts (`lare build`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from transformers import set_seed

from .modeling.components import load_text_tokenizer
from .modeling.configuration_lare import LaReConfig
from .modeling.modeling_lare import LaReForConditionalGeneration
from .modeling.reconstruction import TINY_IMAGE_TOKENIZER_CONFIG, TINY_RECONSTRUCTOR_CONFIG
from .processing.processing_lare import LaReProcessor, build_processor
from .processing.tokenization import add_lare_special_tokens, build_tiny_tokenizer

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def available_presets() -> list[str]:
    """Names of the model presets shipped in `configs/` (`lare-*.yaml`)."""
    return sorted(path.stem for path in CONFIGS_DIR.glob("lare-*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Read a model preset by name (`lare-tiny`, `tiny`, `lare-1.5b`, ...) or from a YAML file path."""
    path = Path(name_or_path)
    if not path.is_file():
        name = name_or_path if name_or_path.startswith("lare-") else f"lare-{name_or_path}"
        path = CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(
            f"Unknown preset {name_or_path!r}. Available presets: {', '.join(available_presets())}; "
            "or pass the path of a preset YAML file."
        )
    with open(path) as handle:
        preset = yaml.safe_load(handle)
    if not isinstance(preset, dict) or not isinstance(preset.get("model"), dict):
        raise ValueError(f"Preset file {path} must be a mapping with a `model:` section of LaReConfig fields.")
    LaReConfig.check_field_names(preset["model"], f"LaReConfig field in preset {path}:")
    return preset


def build_tiny(
    overrides: dict[str, Any] | None = None, seed: int | None = None
) -> tuple[LaReForConditionalGeneration, LaReProcessor]:
    """The `lare-tiny` preset: random-init model and offline processor, deterministic for a seed."""
    preset = load_preset("lare-tiny")
    tokenizer = build_tiny_tokenizer()
    special_ids = add_lare_special_tokens(tokenizer)
    model_kwargs = dict(preset["model"])
    LaReConfig.check_field_names(overrides or {}, "LaReConfig field (override)")
    model_kwargs.update(overrides or {})
    for key, tiny in (
        ("reconstructor_config", TINY_RECONSTRUCTOR_CONFIG),
        ("image_tokenizer_config", TINY_IMAGE_TOKENIZER_CONFIG),
    ):
        if model_kwargs.get(key) == "tiny":
            model_kwargs[key] = dict(tiny)
    model_kwargs["text_config"] = dict(model_kwargs["text_config"], vocab_size=len(tokenizer))
    model_kwargs["text_config"].setdefault("pad_token_id", tokenizer.pad_token_id)
    model_kwargs["text_config"].setdefault("eos_token_id", tokenizer.eos_token_id)
    config = LaReConfig(**special_ids, **model_kwargs)
    set_seed(preset.get("seed", 0) if seed is None else seed)
    model = LaReForConditionalGeneration(config)
    model._set_generation_defaults(None, tokenizer)
    return model, _processor_for(model.config, tokenizer)


def build_from_components(
    vision: str,
    text: str,
    image_tokenizer: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[LaReForConditionalGeneration, LaReProcessor]:
    """Model and processor from pretrained parts in one call, ready to train: the LaRe tokens added to the LM's
    tokenizer, the embeddings resized, the processor built from the vision encoder's image preprocessing.

    `text` may be a GGUF file or a folder holding one (dequantised; see `LaReForConditionalGeneration.from_components`).
    """
    overrides = dict(overrides or {})
    LaReConfig.check_field_names(overrides, "LaReConfig field (override)")
    tokenizer = load_text_tokenizer(text)
    model = LaReForConditionalGeneration.from_components(
        vision, text, tokenizer=tokenizer, image_tokenizer=image_tokenizer, **overrides
    )
    return model, _processor_for(model.config, tokenizer)


def _processor_for(config: LaReConfig, tokenizer) -> LaReProcessor:
    """The processor matching a model config: its image size, patch count, K, m and pixel normalisation."""
    return build_processor(
        tokenizer,
        image_size=config.vision_config.image_size,
        image_seq_length=config.image_seq_length,
        num_latent_steps=config.num_latent_steps,
        latent_tokens_per_step=config.latent_tokens_per_step,
        image_mean=config.image_mean,
        image_std=config.image_std,
    )


def build_preset(name_or_path: str, overrides: dict[str, Any] | None = None, **component_overrides: str | None):
    """Build any preset: `lare-tiny` offline, the others from their named pretrained components."""
    preset = load_preset(name_or_path)
    if preset.get("tokenizer") == "tiny":
        return build_tiny(overrides=overrides)
    components = dict(preset.get("components") or {})
    components.update({key: value for key, value in component_overrides.items() if value})
    if not components.get("vision") or not components.get("text"):
        raise ValueError(f"Preset {name_or_path!r} needs `components: {{vision: ..., text: ...}}`.")
    try:
        return build_from_components(
            components["vision"],
            components["text"],
            image_tokenizer=components.get("image_tokenizer"),
            overrides={**preset["model"], **(overrides or {})},
        )
    except OSError as error:
        raise ValueError(
            f"Could not load the components of preset {name_or_path!r} (vision {components['vision']!r}, text "
            f"{components['text']!r}): {str(error).splitlines()[0]} They must be in the local Hugging Face cache or "
            "reachable; otherwise download them elsewhere and pass the folders: "
            "lare build --preset NAME --vision DIR --text DIR [--image-tokenizer DIR] --output DIR."
        ) from error


def build_checkpoint_parts(
    preset: str | None = None,
    vision: str | None = None,
    text: str | None = None,
    image_tokenizer: str | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int | None = None,
) -> tuple[LaReForConditionalGeneration, LaReProcessor]:
    """What `lare build` builds: from pretrained `vision` + `text` parts (with the model fields of `preset`, when
    given, under `overrides`), else the tiny preset (random init for `seed`), else a paper preset from its named
    components (`overrides` limited to use_reconstructor / image_loss_weight there)."""
    overrides = dict(overrides or {})
    if vision or text:
        if not (vision and text):
            raise ValueError("--vision and --text go together (or use --preset).")
        base = load_preset(preset)["model"] if preset else {}
        base = {key: value for key, value in base.items() if key not in ("vision_config", "text_config")}
        base.update(overrides)
        return build_from_components(vision, text, image_tokenizer=image_tokenizer, overrides=base)
    if preset in ("tiny", "lare-tiny"):
        if image_tokenizer:
            raise ValueError(
                "--image-tokenizer is not used by --preset tiny (it builds its own tiny random KL-16); pass it with "
                "--vision/--text or a full-size preset."
            )
        return build_tiny(overrides=overrides, seed=seed)
    if set(overrides) - {"use_reconstructor", "image_loss_weight"}:
        raise ValueError("--set is supported with --preset tiny or with --vision/--text.")
    return build_preset(preset, image_tokenizer=image_tokenizer, overrides=overrides)


def save_checkpoint(model: LaReForConditionalGeneration, processor: LaReProcessor, output_dir: str) -> Path:
    """Write model (safetensors + custom code) and processor into one folder."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output


__all__ = [
    "available_presets",
    "build_checkpoint_parts",
    "build_from_components",
    "build_preset",
    "build_tiny",
    "load_preset",
    "save_checkpoint",
]
