"""Shared fixtures: one `lare-tiny` checkpoint built offline and saved to disk for the whole session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lare_hf  # noqa: F401  (registers the Auto classes)
from lare_hf.build import build_tiny, save_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """`lare build --preset tiny` equivalent: a saved random-init checkpoint with its processor."""
    model, processor = build_tiny()
    path = tmp_path_factory.mktemp("lare-tiny")
    save_checkpoint(model, processor, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    return model, processor


def make_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def chat(image: Image.Image | None, text: str) -> list[dict]:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
