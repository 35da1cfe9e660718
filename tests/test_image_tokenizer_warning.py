"""Issue 28 item 5: `lare build` and stages II-IV warn when L_img trains against a randomly initialised KL-16."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import AutoConfig

from conftest import make_image
from lare_hf.cli import main
from lare_hf.modeling.reconstruction import TINY_IMAGE_TOKENIZER_CONFIG, TINY_RECONSTRUCTOR_CONFIG
from lare_hf.training.run import run_stage
from test_training import stage_args

WARNING_LOGGER = "lare_hf.modeling.image_tokenizer_check"


def random_tokenizer_warnings(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == WARNING_LOGGER and record.levelno == logging.WARNING
    ]


def test_tiny_build_warns_that_the_image_tokenizer_is_random(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=WARNING_LOGGER)
    assert main(["build", "--preset", "tiny", "--output", str(tmp_path / "tiny")]) == 0
    (message,) = random_tokenizer_warnings(caplog)
    assert message.startswith("lare build: L_img")
    assert "RANDOMLY INITIALISED" in message and "meaningless" in message
    assert "--image-tokenizer DIR" in message and "smoke tests" in message
    assert "docs/image_tokenizer.md" in message


def test_no_warning_without_the_image_loss(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=WARNING_LOGGER)
    assert main(["build", "--preset", "tiny", "--output", str(tmp_path / "a"), "--set", "image_loss_weight=0"]) == 0
    assert main(["build", "--preset", "tiny", "--output", str(tmp_path / "b"), "--no-reconstructor"]) == 0
    assert random_tokenizer_warnings(caplog) == []


def test_tiny_preset_refuses_an_image_tokenizer_it_would_ignore(tmp_path, capsys):
    code = main(["build", "--preset", "tiny", "--image-tokenizer", str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "--image-tokenizer is not used by --preset tiny" in capsys.readouterr().err


def test_build_with_a_pretrained_image_tokenizer_does_not_warn(tmp_path, tiny_parts, caplog):
    root, _, _ = tiny_parts
    torch.manual_seed(1)
    AutoencoderKL(**TINY_IMAGE_TOKENIZER_CONFIG).save_pretrained(tmp_path / "kl16")
    caplog.set_level(logging.WARNING, logger=WARNING_LOGGER)
    out = tmp_path / "assembled"
    code = main(["build", "--vision", str(root / "clip"), "--text", str(root / "qwen"),
                 "--image-tokenizer", str(tmp_path / "kl16"), "--output", str(out),
                 "--set", "extractor_num_heads=4", "latent_tokens_per_step=2", "window_size=4", "window_stride=2",
                 f"reconstructor_config={json.dumps(TINY_RECONSTRUCTOR_CONFIG)}", "reconstruction_image_size=64"])  # fmt: skip
    assert code == 0
    assert random_tokenizer_warnings(caplog) == []
    # the record that tells a pretrained tokenizer from a random one travels in config.json
    config = AutoConfig.from_pretrained(out)
    assert config.components["image_tokenizer"]["source"] == str(tmp_path / "kl16")


@pytest.mark.parametrize(
    ("stage", "overrides", "warns"),
    [(2, None, True), (2, '{"image_loss_weight": 0}', False), (1, None, False)],
)
def test_training_stages_with_the_image_loss_warn(stage, overrides, warns, tiny_checkpoint, tmp_path, caplog):
    data = tmp_path / "train.jsonl"
    (tmp_path / "images").mkdir()
    with open(data, "w") as handle:
        for index in range(2):
            make_image(index).save(tmp_path / "images" / f"{index}.png")
            handle.write(json.dumps({"image": f"images/{index}.png", "question": "Which digit?",
                                     "rationale": f"It shows {index}.", "answer": str(index)}) + "\n")  # fmt: skip
    extra = ("--max_steps", "1") + (("--model_overrides", overrides) if overrides else ())
    caplog.set_level(logging.WARNING, logger=WARNING_LOGGER)
    run_stage(*stage_args(stage, tiny_checkpoint, str(data), tmp_path / "out", *extra))
    messages = random_tokenizer_warnings(caplog)
    assert bool(messages) == warns
    if warns:
        assert messages[0].startswith(f"lare train --stage {stage}: L_img")
