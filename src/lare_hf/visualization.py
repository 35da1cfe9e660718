"""Look at what LaRe refocused on: per latent step, the saliency map and the chosen window over the image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

STEP_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def render_refocus(
    image: Image.Image,
    saliency_maps: torch.Tensor,
    window_positions: torch.Tensor,
    window_size: int,
    scale: int = 4,
) -> Image.Image:
    """A strip with one panel per latent step: the image under its saliency heatmap, the step's window outlined.

    Args:
        image: the image as the model saw it (resized to the vision tower's input size).
        saliency_maps: `[K, grid, grid]` one sample's `saliency_maps` from the model output.
        window_positions: `[K, 2]` one sample's `window_positions` (row, column in patches).
        window_size: window side in patches (`config.window_size`).
        scale: upscaling factor of each panel, for small images.
    """
    num_steps, grid, _ = saliency_maps.shape
    side = image.width * scale
    cell = side / grid
    base = image.convert("RGB").resize((side, side), Image.NEAREST)
    panels = []
    for step in range(num_steps):
        heat = saliency_maps[step].float()
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
        heat_image = Image.fromarray((heat.cpu().numpy() * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        red = Image.merge("RGB", (heat_image, Image.new("L", heat_image.size, 0), Image.new("L", heat_image.size, 0)))
        panel = Image.blend(base, red, 0.45)
        row, col = (int(v) for v in window_positions[step].tolist())
        box = [col * cell, row * cell, (col + window_size) * cell - 1, (row + window_size) * cell - 1]
        ImageDraw.Draw(panel).rectangle(box, outline=STEP_COLOURS[step % len(STEP_COLOURS)], width=max(1, scale // 2))
        ImageDraw.Draw(panel).text((3, 2), f"k={step + 1}", fill=(255, 255, 255))
        panels.append(panel)
    strip = Image.new("RGB", (side * num_steps + 4 * (num_steps - 1), side), (255, 255, 255))
    for step, panel in enumerate(panels):
        strip.paste(panel, (step * (side + 4), 0))
    return strip


__all__ = ["render_refocus"]
