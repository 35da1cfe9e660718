"""Shared fixtures: one `lare-tiny` checkpoint built offline and saved to disk for the whole session."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, Qwen2Config, Qwen2ForCausalLM

import lare_hf  # noqa: F401  (registers the Auto classes)
from lare_hf.build import build_tiny, save_checkpoint
from lare_hf.processing.tokenization import build_tiny_tokenizer


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


@pytest.fixture(scope="session")
def reasoning_file(tmp_path_factory) -> str:
    """Eight reasoning records with PNG images, as JSONL with relative image paths."""
    root = tmp_path_factory.mktemp("reasoning")
    (root / "images").mkdir()
    with open(root / "train.jsonl", "w") as handle:
        for index in range(8):
            make_image(100 + index).save(root / "images" / f"{index}.png")
            digit = index % 10
            record = {
                "id": f"r{index}",
                "image": f"images/{index}.png",
                "question": "Which digit is in the red square?",
                "rationale": f"The red square is at the top left. It contains the digit {digit}.",
                "answer": str(digit),
            }
            handle.write(json.dumps(record) + "\n")
    return str(root / "train.jsonl")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """A full CLIP checkpoint and a Qwen2 causal LM with a tokenizer, saved to local folders."""
    root = tmp_path_factory.mktemp("parts")
    clip_config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=8, image_size=64),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(clip_config).save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        root / "clip"
    )
    tokenizer = build_tiny_tokenizer()
    # an LM whose embedding table is smaller than the tokenizer: building must resize it
    text_config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=len(tokenizer) - 4, tie_word_embeddings=True)  # fmt: skip
    lm = Qwen2ForCausalLM(text_config)
    lm.save_pretrained(root / "qwen")
    tokenizer.save_pretrained(root / "qwen")
    return root, CLIPModel.from_pretrained(root / "clip"), Qwen2ForCausalLM.from_pretrained(root / "qwen")


def free_port() -> int:
    """A free TCP port on localhost for a test's torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
