"""Loading the pretrained parts a LaRe model is assembled from (Sec. 4.2): the LaRe special tokens added to the
language model's tokenizer, a text checkpoint given as a GGUF file, the vision encoder's image normalisation.

Shared by `LaReForConditionalGeneration.from_components` and `LaReProcessor.from_components`, so that both add the
same tokens in the same order (hence the same ids) to the same tokenizer. Imports only transformers and tokenizers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .configuration_lare import LARE_SPECIAL_TOKENS


def add_lare_special_tokens(tokenizer: PreTrainedTokenizerBase, image_token: str | None = None) -> dict[str, int]:
    """Add the four LaRe tokens (`<|image|>`, `<|latent_start|>`, `<|latent|>`, `<|latent_end|>`) to a tokenizer as
    special tokens, if missing, and give them named attributes (`tokenizer.image_token`, `tokenizer.image_token_id`,
    ...). Idempotent. Returns the ids under the names of the `LaReConfig` fields (`image_token_id`, ...).

    `image_token`: a checkpoint's own image token (LLaVA's `<image>`) used instead of `<|image|>`."""
    named = dict(LARE_SPECIAL_TOKENS)
    if image_token is not None:
        named["image_token"] = image_token
    for name, token in named.items():
        current = getattr(tokenizer, name, None)
        if current is not None and str(current) != token:
            raise ValueError(f"The tokenizer already defines {name}={str(current)!r}, but LaRe needs {token!r}.")
    # Named attributes (saved in tokenizer_config.json as `image_token: "<|image|>"`, ...).
    missing_names = {name: token for name, token in named.items() if name not in tokenizer.SPECIAL_TOKENS_ATTRIBUTES}
    if missing_names:
        tokenizer._set_model_specific_special_tokens(special_tokens=missing_names)
    for name, token in named.items():
        if getattr(tokenizer, name, None) is None:
            setattr(tokenizer, name, token)
    vocab = tokenizer.get_vocab()
    new_tokens = [
        AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False)
        for token in named.values()
        if token not in vocab
    ]
    if new_tokens:
        tokenizer.add_tokens(new_tokens, special_tokens=True)
    ids = {}
    for name, token in named.items():
        token_ids = tokenizer.encode(token, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(f"{token!r} is not a single token in this tokenizer (got ids {token_ids}).")
        ids[f"{name}_id"] = token_ids[0]
        if getattr(tokenizer, f"{name}_id") != token_ids[0]:
            raise ValueError(f"tokenizer.{name}_id does not match the id of {token!r}.")
    return ids


def text_checkpoint(text: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Where and how to load a text component: `(path, from_pretrained kwargs)`.

    A `.gguf` file, or a folder holding exactly one `.gguf` file and no `config.json`, loads with transformers' GGUF
    support (`gguf_file=...`, weights dequantised to a normal float checkpoint; needs the `gguf` package). Anything
    else (a folder with `config.json`, a Hub id) is passed on unchanged.
    """
    path = Path(text)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"text={str(text)!r} is a file but not a .gguf file; pass a checkpoint folder, a Hub id or a GGUF file."
            )
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if len(found) == 1:
            return str(path), {"gguf_file": found[0]}
        if len(found) > 1:
            raise ValueError(
                f"text={str(text)!r} holds several GGUF files ({', '.join(found)}); pass the path of the one to use."
            )
    return str(text), {}


def load_text_tokenizer(text: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The language model's tokenizer (from a checkpoint folder, a Hub id or a GGUF file), left-padded."""
    path, kwargs = text_checkpoint(text)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    tokenizer.padding_side = "left"
    return tokenizer


def component_license(source: str | os.PathLike) -> str | None:
    """The license a pretrained part declares, or None when it declares none that can be read offline: a GGUF
    file's `general.license`, the `license:` of the model card (README.md) in a folder or in the local Hub cache."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        try:
            from gguf import GGUFReader
        except ImportError:
            return None
        field = GGUFReader(str(path)).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    card = path / "README.md" if path.is_dir() else None
    if card is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(source), "README.md")
        except Exception:  # noqa: BLE001  (not a Hub id: nothing to read)
            cached = None
        card = Path(cached) if isinstance(cached, str) else None
    if card is None or not card.is_file():
        return None
    from huggingface_hub import ModelCard

    license_name = ModelCard.load(card).data.license
    return str(license_name) if license_name else None


def component_record(component) -> dict[str, str | None]:
    """`{"source", "license"}` of a pretrained part given as a Hub id, a path, or a loaded model."""
    source = component if isinstance(component, (str, os.PathLike)) else getattr(component, "name_or_path", "")
    source = str(source or type(component).__name__)
    return {"source": source, "license": component_license(source) if source else None}


def vision_image_normalization(vision: str | os.PathLike) -> dict[str, list[float]]:
    """`image_mean` / `image_std` of a vision encoder's own image preprocessing (`preprocessor_config.json`): the
    processor applies them and the image reconstructor undoes them."""
    path = Path(vision)
    if path.is_dir():
        config_file = path / "preprocessor_config.json"
        if not config_file.is_file():
            raise ValueError(
                f"vision={str(vision)!r} has no preprocessor_config.json, so its image normalisation is unknown. "
                "Save the encoder's image processor into that folder, or pass image_mean=[...] and image_std=[...]."
            )
        values = json.loads(config_file.read_text())
    else:
        from transformers.image_processing_utils import ImageProcessingMixin

        values, _ = ImageProcessingMixin.get_image_processor_dict(str(vision))
    return {"image_mean": list(values["image_mean"]), "image_std": list(values["image_std"])}


__all__ = [
    "add_lare_special_tokens",
    "component_license",
    "component_record",
    "load_text_tokenizer",
    "text_checkpoint",
    "vision_image_normalization",
]
