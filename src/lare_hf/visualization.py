"""Look at what LaRe refocused on: per latent step, the saliency map and the chosen window over the image, and the
Extractor's attention inside the window."""

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


def extractor_attention_maps(
    extractor_attentions: torch.Tensor, window_positions: torch.Tensor, window_size: int, grid: int
) -> torch.Tensor:
    """The Extractor's cross-attention of each step on the patch grid: `[N, K, grid, grid]`, the attention of the m
    latent queries (averaged) over the window's visual tokens V_s (Eq. 4) placed at the window's patches, 0 outside
    the window. `extractor_attentions` `[N, K, m, window_size**2]` (row-major within the window, as the window's
    tokens are gathered), `window_positions` `[N, K, 2]`."""
    num, steps = extractor_attentions.shape[:2]
    weights = extractor_attentions.float().mean(dim=2).view(num, steps, window_size, window_size)
    maps = torch.zeros(num, steps, grid, grid)
    for i in range(num):
        for k in range(steps):
            row, col = (int(v) for v in window_positions[i, k].tolist())
            maps[i, k, row : row + window_size, col : col + window_size] = weights[i, k]
    return maps


def _wrap(text: str, width: int = 36, max_lines: int = 14) -> str:
    """`text` in lines of at most `width` characters (at most `max_lines`, the last one ending in "...")."""
    import textwrap

    lines = [part for line in text.splitlines() for part in (textwrap.wrap(line, width) or [""])]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1][: width - 3] + "..."]
    return "\n".join(lines)


def plot_refocus_grid(
    images: list[Image.Image],
    saliency_maps: torch.Tensor,
    window_positions: torch.Tensor,
    window_size: int,
    path: str,
    titles: list[str] | None = None,
    needed_cells: list[list[list[int]]] | None = None,
    extractor_attentions: torch.Tensor | None = None,
) -> str:
    """Fig. 3-style PNG (matplotlib): one row per sample, one column per latent step k; each panel is the image
    under step k's saliency heatmap (grey veil, bright = high) with the chosen window outlined (green) and, when
    given, the cell that reasoning step k needs (dashed black). With `extractor_attentions` each sample gets a
    second row: the Extractor's cross-attention inside step k's window (Eq. 4; `extractor_attention_maps`), the
    heatmap the paper's Fig. 3 shows, the rest of the image veiled.

    Args:
        images: the images as the model saw them.
        saliency_maps: `[N, K, grid, grid]` (`saliency_maps` of the model output).
        window_positions: `[N, K, 2]` (row, column) of each window's top-left patch.
        window_size: window side in patches (the whole grid when the window is ablated).
        path: where the PNG goes.
        titles: per sample, the text beside its steps (e.g. question, gold answer and the generated reasoning).
        needed_cells: per sample, per reasoning step, the [row, col] it needs (e.g. RefocusChains `visited_cells`).
        extractor_attentions: `[N, K, m, window_size**2]` (`extractor_attentions` of the model output).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    num, steps, grid, _ = saliency_maps.shape
    attention_maps = None
    if extractor_attentions is not None:
        attention_maps = extractor_attention_maps(extractor_attentions, window_positions, window_size, grid)
    rows_per_sample = 1 if attention_maps is None else 2
    offset = 2 if titles else 1
    fig, axes = plt.subplots(num * rows_per_sample, steps + offset,
                             figsize=(2.0 * (steps + offset) + (1.6 if titles else 0), 2.1 * num * rows_per_sample),
                             squeeze=False)  # fmt: skip
    for i in range(num):
        pixels = np.asarray(images[i].convert("RGB"))
        side = pixels.shape[0]
        cell = side / grid
        first = i * rows_per_sample
        if titles:
            for extra in range(rows_per_sample):
                axes[first + extra][0].axis("off")
            axes[first][0].text(0.0, 1.0, _wrap(titles[i]), fontsize=6.5, va="top", ha="left", family="monospace",
                                transform=axes[first][0].transAxes, clip_on=False)  # fmt: skip
        axes[first][offset - 1].imshow(pixels, interpolation="nearest")
        axes[first][offset - 1].set_title("image", fontsize=8)
        layers = [("saliency", saliency_maps[i], "gray")]
        if attention_maps is not None:
            axes[first + 1][offset - 1].axis("off")
            layers.append(("Extractor attention", attention_maps[i], "magma"))
        for layer, (name, maps, colours) in enumerate(layers):
            for k in range(steps):
                ax = axes[first + layer][k + offset]
                ax.imshow(pixels, interpolation="nearest")
                ax.imshow(maps[k].float().cpu().numpy(), cmap=colours, alpha=0.5 if layer == 0 else 0.6,
                          extent=(-0.5, side - 0.5, side - 0.5, -0.5), interpolation="nearest")  # fmt: skip
                row, col = (int(v) for v in window_positions[i, k].tolist())
                ax.add_patch(patches.Rectangle((col * cell - 0.5, row * cell - 0.5), window_size * cell,
                                               window_size * cell, fill=False, edgecolor="lime", linewidth=3))  # fmt: skip
                if needed_cells and k < len(needed_cells[i]):
                    r, c = needed_cells[i][k]
                    ax.add_patch(patches.Rectangle((c * cell + 0.5, r * cell + 0.5), cell - 2, cell - 2, fill=False,
                                                   edgecolor="black", linewidth=1.5, linestyle="--"))  # fmt: skip
                ax.set_title(f"step {k + 1}: {name}", fontsize=7)
        for ax in [axis for extra in range(rows_per_sample) for axis in axes[first + extra][offset - 1 :]]:
            ax.set_xticks([])
            ax.set_yticks([])
    heading = (
        "Where each latent step refocused: saliency (bright = high), window (green), cell the step needs (dashed)"
    )
    if attention_maps is not None:
        heading += ";\nbelow: the Extractor's attention over the window's visual tokens (bright = high)"
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["extractor_attention_maps", "plot_refocus_grid", "render_refocus"]
