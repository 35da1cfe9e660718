"""Fig. 4's decoder (§4.4): the reconstructor fine-tuned on an image set from the frozen model's latents
(`lare_hf.analysis.reconstructor`, `lare analyze finetune-reconstructor`, `lare analyze figures --reconstructor`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

COLORS = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (230, 200, 20)]


def draw_images(folder, count: int = 6) -> list[Image.Image]:
    """`count` 64x64 PNGs in `folder`: a coloured disc or box on white, in a different place each."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index in range(count):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        box = [6 + 4 * index, 8 + 3 * index, 34 + 4 * index, 36 + 3 * index]
        (draw.ellipse if index % 2 else draw.rectangle)(box, fill=COLORS[index % 4])
        image.save(folder / f"{index}.png")
        images.append(image)
    return images


@pytest.fixture(scope="module")
def finetuned(tiny_checkpoint, tmp_path_factory):
    """The tiny model before and after fine-tuning its reconstructor on six drawn images (K=2), and the report."""
    from lare_hf.analysis.common import load_model
    from lare_hf.analysis.reconstructor import finetune_reconstructor, image_samples

    folder = tmp_path_factory.mktemp("drawn")
    draw_images(folder / "images")
    samples = image_samples(folder / "images")
    model, processor = load_model(tiny_checkpoint)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = finetune_reconstructor(
        model, processor, samples, epochs=8, batch_size=3, learning_rate=2e-3, num_latent_steps=2, progress=False
    )
    return model, processor, samples, before, report, folder


def test_finetuning_lowers_the_loss_and_changes_only_the_reconstructor(finetuned):
    model, _, samples, before, report, _ = finetuned
    assert len(samples) == 6 and report["num_images"] == 6 and report["optimizer_steps"] == 16
    # the seeded Eq. 7 loss on the training images (same t and noise before and after) goes down
    # (without training the two are equal; 16 steps bring it from 0.985 to 0.887 here)
    assert report["eval_loss_after"] < 0.95 * report["eval_loss_before"], report
    assert len(report["epoch_losses"]) == 8 and report["eval_loss_after_other_latents"] is not None
    assert report["image_tokenizer_pretrained"] is False  # the tiny preset: a random KL-16
    assert report["eval_loss_after_other_latents"] != report["eval_loss_after"]  # other pairs were decoded
    after = model.state_dict()
    trained = ("reconstructor.unet.", "reconstructor.condition_proj.")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(trained) for name in changed)  # the rest is bit-identical
    assert any(name.startswith("reconstructor.condition_proj.") for name in changed)
    assert not any(name.startswith("reconstructor.image_tokenizer.") for name in changed)  # KL-16 stays frozen
    assert not any(p.requires_grad for p in model.parameters())


def test_the_saved_reconstructor_loads_and_decodes_as_the_trained_one(finetuned, tiny_checkpoint, tmp_path):
    from lare_hf.analysis.common import load_model
    from lare_hf.analysis.reconstructor import load_reconstructor, save_reconstructor

    model, _, _, _, report, _ = finetuned
    save_reconstructor(model.reconstructor, tmp_path / "rec", report)
    fresh, _ = load_model(tiny_checkpoint)
    loaded = load_reconstructor(tmp_path / "rec", fresh)
    assert loaded.metadata["target"] == "image" and loaded.metadata["condition_dim"] == 64
    expected = model.reconstructor.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
    latents = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(0))
    drawn = loaded.sample(latents, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(drawn, model.reconstructor.sample(latents, 3, torch.Generator().manual_seed(1)))
    original = fresh.reconstructor.sample(latents, 3, torch.Generator().manual_seed(1))
    assert (drawn - original).abs().max() > 1e-3  # the fine-tuned decoder is not the checkpoint's
    with pytest.raises(FileNotFoundError, match="--reconstructor .* no reconstructor.json"):
        load_reconstructor(tmp_path, fresh)


def test_a_datasets_image_set_gives_the_same_images(tmp_path):
    import datasets

    from lare_hf.analysis.reconstructor import image_samples

    images = draw_images(tmp_path / "png", count=3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2]}, features=features).save_to_disk(tmp_path / "ds")
    samples = image_samples(tmp_path / "ds", prompt="What is drawn?")
    assert [s.prompt for s in samples] == ["What is drawn?"] * 3
    assert all(np.array_equal(np.asarray(s.image), np.asarray(i)) for s, i in zip(samples, images))


def test_cli_finetunes_then_figures_draws_fig4_with_it(tiny_checkpoint, tmp_path, capsys):
    from lare_hf.cli import main
    from lare_hf.data.refocus_chains import write_refocus_chains

    draw_images(tmp_path / "images")
    output = tmp_path / "rec"
    command = ["analyze", "finetune-reconstructor", "--model", tiny_checkpoint, "--images", str(tmp_path / "images"),
               "--epochs", "1", "--batch-size", "3", "--num-latent-steps", "2", "--eval-images", "3"]  # fmt: skip
    assert main([*command, "--output", str(output)]) == 0
    assert "Wrote" in capsys.readouterr().out
    metadata = json.loads((output / "reconstructor.json").read_text())
    assert metadata["model"] == tiny_checkpoint and metadata["epochs"] == 1 and metadata["num_images"] == 6
    # nothing is written over an existing output without --overwrite; bad inputs are named
    weights = (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main([*command, "--output", str(output)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    (tmp_path / "empty").mkdir()
    bad_images = [*command[:5], str(tmp_path / "empty"), *command[6:], "--output", str(tmp_path / "o1")]
    assert main(bad_images) == 2
    assert "--images" in capsys.readouterr().err and not (tmp_path / "o1" / "reconstructor.json").exists()
    bad_model = [*command[:3], str(output / "unet"), *command[4:], "--output", str(tmp_path / "o2")]
    assert main(bad_model) == 2
    assert "--model" in capsys.readouterr().err
    assert main([*command, "--output", str(tmp_path / "o3"), "--epochs", "0"]) == 2
    assert "--epochs must be a positive integer" in capsys.readouterr().err

    data = write_refocus_chains(tmp_path / "chains", num_train=0, num_test=1, seed=3)["test"]
    figures = ["analyze", "figures", "--model", tiny_checkpoint, "--data", data, "--num-samples", "1",
               "--num-latent-steps", "2", "--num-inference-steps", "3", "--max-new-tokens", "2"]  # fmt: skip
    assert main([*figures, "--output", str(tmp_path / "default")]) == 0
    assert main([*figures, "--output", str(tmp_path / "tuned"), "--reconstructor", str(output)]) == 0
    reports = {name: json.loads((tmp_path / name / "figures.json").read_text()) for name in ("default", "tuned")}
    assert reports["tuned"]["reconstructor"] == str(output)
    assert "fine-tuned on 6 images" in reports["tuned"]["reconstruction_decoder"]
    assert "checkpoint's reconstructor" in reports["default"]["reconstruction_decoder"]
    pictures = {name: np.asarray(Image.open(tmp_path / name / "fig4_reconstruction.png")) for name in reports}
    assert pictures["default"].shape == pictures["tuned"].shape
    lower = 2 * pictures["default"].shape[0] // 3  # the row drawn from the latents (the title differs too)
    assert not np.array_equal(pictures["default"][lower:], pictures["tuned"][lower:])


def test_targets_are_the_whole_image_or_the_window_crop_of_l_img(finetuned):
    from lare_hf.analysis.reconstructor import reconstruction_targets
    from lare_hf.evaluation.runner import refocus_record

    model, processor, samples, _, _, _ = finetuned
    record = refocus_record(model, processor, samples[:2], 2)
    reconstructor = model.reconstructor
    whole = reconstruction_targets(model, reconstructor, record, "image")
    mean = torch.tensor(reconstructor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(reconstructor.image_std).view(1, 3, 1, 1)
    pixels = ((record["pixel_values"] * std + mean).clamp(0, 1) * 2 - 1).repeat_interleave(2, dim=0)
    torch.testing.assert_close(whole, pixels)  # 64-px images, 64-px reconstructions: no resize
    windows = reconstruction_targets(model, reconstructor, record, "window")
    side = model.config.effective_window_size * model.config.vision_config.patch_size  # 32 px, resized to 64
    row, col = (record["window_positions"][1, 1] * model.config.vision_config.patch_size).tolist()
    crop = pixels[3:4, :, row : row + side, col : col + side]
    expected = torch.nn.functional.interpolate(crop, size=(64, 64), mode="bilinear", antialias=True)
    torch.testing.assert_close(windows[3:4], expected.clamp(-1, 1))
    assert not torch.equal(whole, windows)
