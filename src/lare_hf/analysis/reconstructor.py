"""The decoder of Fig. 4: the reconstructor fine-tuned on an image set, conditioned on the latents of the frozen model.

§4.4: "a U-net fine-tuned for five epochs on ImageNet-1K can successfully recover clear scenes from the latent
sequences". `finetune_reconstructor` freezes the LaRe model, runs its latent phase on each image (a one-turn chat:
the image and `prompt`, K latent steps, as `lare analyze figures` prompts it) and trains only the reconstructor (its
U-Net and condition projection; the KL-16 image tokenizer stays frozen) with the objective of L_img, Eq. 7
(`LaReImageReconstructor.forward`, the one implementation): from step k's latent tokens Z^(k) to, by default, the
whole image ("clear scenes"), or with `target="window"` the crop under step k's window (what L_img reconstructs).

Our choices where the paper is silent (not in the paper): the prompt ("Describe the image."); each step's latents
reconstruct the image on their own, as L_img conditions on one step; AdamW with the stage II recipe's settings (lr
1e-4, weight decay 0.05, 3% warmup then cosine decay); the reconstructor trains in float32.

`save_reconstructor` writes the result in diffusers' layout (`unet/`, `image_tokenizer/`, `scheduler/`, each readable
by its class's `from_pretrained`), the condition projection as `condition_proj.safetensors` and `reconstructor.json`
(what it was trained on); `load_reconstructor` reads it back for a model.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed
from transformers.utils import logging

from ..data.files import is_save_to_disk_folder, read_table
from ..destinations import refuse_non_empty, staged_write
from ..evaluation.base import BenchmarkSample
from ..evaluation.runner import refocus_record
from ..modeling.image_tokenizer_check import image_tokenizer_is_pretrained
from ..output_lock import OutputLock
from .common import check_steps, load_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TARGETS = ("image", "window")
DEFAULT_PROMPT = "Describe the image."
METADATA_FILE = "reconstructor.json"
CONDITION_FILE = "condition_proj.safetensors"

logger = logging.get_logger(__name__)


def image_samples(
    images: str | os.PathLike, prompt: str = DEFAULT_PROMPT, split: str | None = None, limit: int | None = None
) -> list[BenchmarkSample]:
    """One prompt per image of `images`: a folder of image files (searched recursively), or a `datasets` image set
    (a `save_to_disk` folder, a parquet / arrow / JSON file or folder of them) with a `datasets.Image` column or an
    `image` column. Images are decoded on access (`lare_hf.data.files.load_image`)."""
    source = os.fspath(images)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--images {source} does not exist; pass a folder of image files (.png, .jpg, ...) or a datasets folder "
            "(save_to_disk) or data file with an image column."
        )
    if path.is_dir() and not is_save_to_disk_folder(path):
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file()
            and file.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
        if files:
            return [BenchmarkSample(str(i), file, prompt, "") for i, file in enumerate(files[:limit])]
    try:
        table, root = read_table(path, split)
    except FileNotFoundError:
        raise ValueError(
            f"--images {source} holds no image files ({', '.join(IMAGE_SUFFIXES)}) and no datasets image set; pass a "
            "folder with at least one image."
        ) from None
    columns = [name for name, feature in table.features.items() if isinstance(feature, datasets.Image)]
    column = columns[0] if columns else "image" if "image" in table.column_names else None
    if column is None:
        raise ValueError(
            f"--images {source} is a table with columns {table.column_names} but no image column (a datasets.Image "
            "feature or a column named 'image'); pass an image set."
        )
    if isinstance(table.features[column], datasets.Image):
        table = table.cast_column(column, datasets.Image(decode=False))
    table = table.select_columns([column])
    count = len(table) if limit is None else min(limit, len(table))
    if count == 0:
        raise ValueError(f"--images {source} has no rows; pass an image set with at least one image.")
    return [BenchmarkSample(str(i), lambda i=i: table[i][column], prompt, "", image_root=root) for i in range(count)]


def reconstruction_targets(model, reconstructor, record: dict[str, torch.Tensor], target: str) -> torch.Tensor:
    """What step k's latents reconstruct, one `[3, S, S]` image in [-1, 1] per (sample, step) row: the whole image
    (`target="image"`) or the crop under step k's window (`"window"`, L_img's target), both by `crop_windows`."""
    pixel_values, windows = record["pixel_values"], record["window_positions"]
    steps = windows.shape[1]
    pixels = pixel_values.repeat_interleave(steps, dim=0)
    if target == "window":
        return reconstructor.crop_windows(pixels, windows.reshape(-1, 2), model.config.effective_window_size)
    whole = torch.zeros(pixels.shape[0], 2, dtype=torch.long)
    return reconstructor.crop_windows(pixels, whole, model.config.patch_grid_size)


def _batch_loss(
    model, processor, samples, steps: int, target: str, generator: torch.Generator, other_latents: bool = False
) -> torch.Tensor:
    """Eq. 7 of the reconstructor on a batch of images, from the frozen model's latents (one row per step); with
    `other_latents`, each image's target is paired with the latents of the next image of the batch."""
    with torch.no_grad():
        record = refocus_record(model, processor, samples, steps, batch_size=len(samples))
        targets = reconstruction_targets(model, model.reconstructor, record, target)
    latents = record["latent_embeds"].reshape(-1, *record["latent_embeds"].shape[2:])
    if other_latents:
        latents = latents.roll(steps, dims=0)
    return model.reconstructor(latents, targets, generator=generator)


@torch.no_grad()
def evaluation_loss(
    model, processor, samples, steps: int, target: str, batch_size: int, seed: int, other_latents: bool = False
) -> float | None:
    """The mean Eq. 7 loss over `samples` with the same timesteps and noise on every call (seeded): comparable
    before and after fine-tuning, and, with `other_latents` (None for a single image), with every image decoded
    from another image's latents: as low as with its own, the decoder does not read the latents."""
    if other_latents and len(samples) < 2:
        return None
    starts = list(range(0, len(samples), max(batch_size, 2)))
    if len(samples) - starts[-1] == 1 and len(starts) > 1:  # no batch of one image: it has no other image
        starts.pop()
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for start, end in zip(starts, [*starts[1:], len(samples)]):
        loss = _batch_loss(model, processor, samples[start:end], steps, target, generator, other_latents)
        total += loss.item() * (end - start)
    return total / len(samples)


def _checked_steps(model, processor, samples, target, num_latent_steps, **counts: int) -> int:
    """K, after checking the fine-tuning's arguments (each error names its command-line flag)."""
    if model.reconstructor is None:
        raise ValueError("--model has no reconstructor (use_reconstructor=False); there is nothing to fine-tune.")
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {TARGETS}, got {target!r}.")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
    if not samples:
        raise ValueError("--images holds no image; pass a set with at least one image.")
    steps = processor.num_latent_steps if num_latent_steps is None else num_latent_steps
    check_steps(model, steps, "--num-latent-steps")
    if steps == 0:
        raise ValueError("--num-latent-steps must be >= 1: the reconstructor decodes latent steps.")
    if not image_tokenizer_is_pretrained(model.config):
        logger.warning(
            "--model's KL-16 image tokenizer is randomly initialised (no pretrained one was given to `lare build "
            "--image-tokenizer`): the reconstructor learns to denoise a random autoencoder's latents, and Fig. 4 can "
            "draw no clearer image than its 'tokenizer round trip' row (docs/image_tokenizer.md)."
        )
    return steps


def _train(model, processor, samples, steps: int, target: str, optimizer, scheduler, epochs: int, batch_size: int,
           seed: int, progress: bool) -> list[float]:  # fmt: skip
    """The epochs (images shuffled by `seed`): Eq. 7 on each batch, AdamW step; the mean loss of each epoch."""
    order = torch.Generator().manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 2)
    total = epochs * math.ceil(len(samples) / batch_size)
    epoch_losses = []
    with tqdm(total=total, desc="fine-tuning the reconstructor", unit="batch", disable=not progress) as bar:
        for epoch in range(epochs):
            permutation = torch.randperm(len(samples), generator=order).tolist()
            losses = []
            for start in range(0, len(samples), batch_size):
                batch = [samples[i] for i in permutation[start : start + batch_size]]
                loss = _batch_loss(model, processor, batch, steps, target, generator)
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            epoch_losses.append(sum(losses) / len(losses))
    return epoch_losses


def finetune_reconstructor(
    model,
    processor,
    samples: list[BenchmarkSample],
    epochs: int = 5,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    target: str = "image",
    num_latent_steps: int | None = None,
    seed: int = 0,
    eval_images: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model.reconstructor` in place (float32) on `samples` for `epochs`; every other weight stays frozen.

    Returns the report: settings, the mean training loss per epoch and the seeded evaluation loss (Eq. 7 on the
    first `eval_images` images) before and after, and after with other images' latents."""
    steps = _checked_steps(
        model, processor, samples, target, num_latent_steps, epochs=epochs, batch_size=batch_size,
        eval_images=eval_images,
    )  # fmt: skip
    set_seed(seed)
    model.eval().requires_grad_(False)
    reconstructor = model.reconstructor.float()
    trainable = [p for module in (reconstructor.unet, reconstructor.condition_proj) for p in module.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    evaluated = samples[:eval_images]
    loss_before = evaluation_loss(model, processor, evaluated, steps, target, batch_size, seed + 1)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    total = epochs * math.ceil(len(samples) / batch_size)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(0.03 * total), num_training_steps=total)
    reconstructor.train()
    epoch_losses = _train(
        model, processor, samples, steps, target, optimizer, scheduler, epochs, batch_size, seed, progress
    )
    reconstructor.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)
    loss_after = evaluation_loss(model, processor, evaluated, steps, target, batch_size, seed + 1)
    loss_other = evaluation_loss(model, processor, evaluated, steps, target, batch_size, seed + 1, other_latents=True)
    return {
        "target": target,
        "num_latent_steps": steps,
        "prompt": samples[0].prompt,
        "num_images": len(samples),
        "epochs": epochs,
        "optimizer_steps": total,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "seed": seed,
        "epoch_losses": epoch_losses,
        "eval_images": len(evaluated),
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "eval_loss_after_other_latents": loss_other,
        "image_tokenizer_pretrained": image_tokenizer_is_pretrained(model.config),
    }


def save_reconstructor(reconstructor, folder: str | Path, metadata: dict[str, Any]) -> Path:
    """Write the reconstructor: `unet/`, `image_tokenizer/`, `scheduler/` (diffusers' `save_pretrained`), the
    condition projection and `reconstructor.json` (`metadata` plus the condition width)."""
    folder = Path(folder)
    reconstructor.unet.save_pretrained(folder / "unet")
    reconstructor.image_tokenizer.save_pretrained(folder / "image_tokenizer")
    reconstructor.noise_scheduler.save_pretrained(folder / "scheduler")
    save_file(
        {k: v.contiguous() for k, v in reconstructor.condition_proj.state_dict().items()}, folder / CONDITION_FILE
    )
    description = {"condition_dim": reconstructor.condition_proj.in_features, **metadata}
    (folder / METADATA_FILE).write_text(json.dumps(description, indent=2))
    return folder


def load_reconstructor(folder: str | Path, model, what: str = "--reconstructor"):
    """A reconstructor written by `save_reconstructor`, shaped by `model`'s config, on the model's device, in eval
    mode; `model` is left unchanged. Raises naming `what` when the folder is not one or does not fit the model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder).expanduser()
    metadata_file = folder / METADATA_FILE
    if not metadata_file.is_file():
        raise FileNotFoundError(
            f"{what} {folder} has no {METADATA_FILE}, so it is not a fine-tuned reconstructor; pass the --output of "
            "`lare analyze finetune-reconstructor`."
        )
    if model.reconstructor is None:
        raise ValueError(f"--model has no reconstructor (use_reconstructor=False), so {what} has no shape to fill.")
    metadata = json.loads(metadata_file.read_text())
    width = model.config.text_config.hidden_size
    if metadata.get("condition_dim") != width:
        raise ValueError(
            f"{what} {folder} decodes latents of width {metadata.get('condition_dim')}, but --model's latents have "
            f"width {width}; fine-tune a reconstructor for this model."
        )
    reconstructor = copy.deepcopy(model.reconstructor).float()
    try:
        reconstructor.unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
        reconstructor.image_tokenizer.load_state_dict(
            AutoencoderKL.from_pretrained(folder / "image_tokenizer").state_dict()
        )
        reconstructor.condition_proj.load_state_dict(load_file(folder / CONDITION_FILE))
    except RuntimeError as error:
        raise ValueError(
            f"{what} {folder} does not fit --model's reconstructor (another U-Net or image tokenizer shape): "
            f"{' '.join(str(error).split())[:300]}"
        ) from None
    reconstructor.metadata = metadata
    return reconstructor.to(model.device).eval()


def run(
    model_dir: str,
    images: str,
    output: str | Path,
    epochs: int = 5,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """`lare analyze finetune-reconstructor`: fine-tune, then write the reconstructor and its report to `output`
    (a non-empty folder is refused unless `overwrite`; locked while written; a failed write keeps its old files).
    `options`: `prompt`, `split`, `limit`, `device` and `finetune_reconstructor`'s keyword arguments."""
    output = refuse_non_empty(output, "lare analyze finetune-reconstructor --output", overwrite)
    if output.expanduser().resolve() == Path(model_dir).expanduser().resolve():
        raise ValueError(f"--output {output} is the --model checkpoint itself; choose another folder.")
    samples = image_samples(
        images, options.pop("prompt", DEFAULT_PROMPT), options.pop("split", None), options.pop("limit", None)
    )
    model, processor = load_model(model_dir, options.pop("device", None))
    with OutputLock(output):
        report = finetune_reconstructor(model, processor, samples, epochs=epochs, **options)
        report = {"model": str(model_dir), "images": str(images), **report}
        with staged_write(output, "the fine-tuned reconstructor") as staging:
            save_reconstructor(model.reconstructor, staging, report)
    return report


def summary(report: dict[str, Any], output: str | Path) -> str:
    """The line `lare analyze finetune-reconstructor` prints: the seeded losses and where the decoder went."""
    other = report["eval_loss_after_other_latents"]
    return (
        f"Fine-tuned the reconstructor on {report['num_images']} images for {report['epochs']} epochs: loss "
        f"{report['eval_loss_before']:.4f} -> {report['eval_loss_after']:.4f} (Eq. 7 on {report['eval_images']} "
        f"images, seeded; {'n/a' if other is None else f'{other:.4f}'} from other images' latents). Wrote {output}; "
        f"draw Fig. 4 with `lare analyze figures --reconstructor {output}`"
    )


__all__ = [
    "finetune_reconstructor",
    "image_samples",
    "load_reconstructor",
    "reconstruction_targets",
    "save_reconstructor",
    "summary",
]
