"""`lare demo`: the whole pipeline on the offline tiny preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .build import build_tiny, save_checkpoint


def demo_image(size: int = 64) -> Image.Image:
    """A small scene: two coloured containers on a light background."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([4, 4, 28, 28], outline=(200, 30, 30), width=2)
    draw.ellipse([36, 34, 60, 58], outline=(30, 30, 200), width=2)
    noise = np.random.default_rng(0).integers(0, 20, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) - noise, 0, 255).astype(np.uint8))


def run_demo(output: str, quick: bool = False) -> dict:
    """Build the tiny preset into `output/model`, then chat with it through the Auto classes."""
    from .cli import generate_answer

    root = Path(output)
    model, processor = build_tiny()
    model_dir = save_checkpoint(model, processor, str(root / "model"))
    print(f"[demo] built lare-tiny into {model_dir}")
    image = demo_image(model.config.vision_config.image_size)
    image_path = root / "scene.png"
    image.save(image_path)
    question = "Which digit is in the red square?"
    answer = generate_answer(str(model_dir), image, question, max_new_tokens=8)
    print(f"[demo] Q: {question}\n[demo] A (untrained model, K={model.config.num_latent_steps}): {answer!r}")
    return {"model_dir": str(model_dir), "answer": answer}
