"""`lare build` (preset and pretrained parts), `from_components`, `lare generate`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
)

from conftest import chat, make_image
from lare_hf.build import available_presets, load_preset
from lare_hf.cli import main


def test_presets_name_the_papers_components():
    assert {"lare-tiny", "lare-0.5b", "lare-1.5b", "lare-7b"} <= set(available_presets())
    for size, text in (
        ("0.5b", "Qwen2.5-0.5B-Instruct"),
        ("1.5b", "Qwen2.5-1.5B-Instruct"),
        ("7b", "Qwen2.5-7B-Instruct"),
    ):
        preset = load_preset(f"lare-{size}")
        assert preset["components"]["vision"] == "openai/clip-vit-large-patch14"
        assert preset["components"]["text"] == f"Qwen/{text}"
        assert preset["model"]["window_size"] == 8 and preset["model"]["num_latent_steps"] == 4
    with pytest.raises(ValueError, match="Unknown preset 'lare-3b'.*lare-tiny"):
        load_preset("lare-3b")


def test_build_tiny_is_deterministic(tmp_path, capsys):
    assert main(["build", "--preset", "tiny", "--output", str(tmp_path / "a")]) == 0
    assert main(["build", "--preset", "tiny", "--output", str(tmp_path / "b")]) == 0
    assert "Wrote lare checkpoint" in capsys.readouterr().out
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert (tmp_path / "a" / "chat_template.jinja").is_file()


def test_unknown_preset_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["build", "--preset", "huge", "--output", str(tmp_path)]) == 2
    assert "Unknown preset 'huge'" in capsys.readouterr().err


def test_build_from_pretrained_parts(tmp_path, tiny_parts):
    root, clip, lm = tiny_parts
    out = tmp_path / "assembled"
    code = main(["build", "--vision", str(root / "clip"), "--text", str(root / "qwen"), "--output", str(out),
                 "--set", "extractor_num_heads=4", "latent_tokens_per_step=2", "window_size=4", "window_stride=2",
                 "use_reconstructor=false"])  # fmt: skip
    assert code == 0
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.image_seq_length == 64
    assert model.config.text_config.vocab_size >= len(processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(model.config.latent_token_id) == "<|latent|>"
    # pretrained weights were copied
    torch.testing.assert_close(
        model.model.vision_tower.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight
    )
    old_rows = lm.get_input_embeddings().weight.shape[0]
    torch.testing.assert_close(model.get_input_embeddings().weight[:old_rows], lm.get_input_embeddings().weight)
    torch.testing.assert_close(
        model.model.language_model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight
    )
    inputs = processor.apply_chat_template(
        chat(make_image(0), "what is here?"), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_lare_generate_prints_the_answer(tmp_path, tiny_checkpoint):
    image_path = tmp_path / "scene.png"
    make_image(3).save(image_path)
    command = [sys.executable, "-m", "lare_hf.cli", "generate", "--model", tiny_checkpoint, "--image", str(image_path),
               "--prompt", "Which digit is in the red square?", "--max-new-tokens", "6"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    from lare_hf.evaluation.runner import generate_answer

    expected = generate_answer(tiny_checkpoint, make_image(3), "Which digit is in the red square?", None, 6)
    assert result.stdout.strip() == expected
    missing = subprocess.run(command[:-6] + ["--image", str(tmp_path / "nope.png"), "--prompt", "x"],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_paper_preset_without_its_components_is_a_clear_error(tmp_path):
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "lare_hf.cli", "build", "--preset", "lare-0.5b", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert "Could not load the components of preset 'lare-0.5b'" in result.stderr
    assert "--vision DIR --text DIR" in result.stderr
