"""Pretrained parts in one call (`from_components` on model and processor), Trainer defaults, inference-only
checkpoints without the reconstructor (and without diffusers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from tokenizers import Tokenizer
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

from conftest import chat, make_image
from lare_hf import LaReForConditionalGeneration, LaReProcessor
from lare_hf.cli import main
from lare_hf.data import LaReDataCollator, records_from_dataset
from lare_hf.modeling.components import text_checkpoint
from lare_hf.modeling.configuration_lare import LARE_SPECIAL_TOKENS
from lare_hf.processing.tokenization import build_tiny_tokenizer
from lare_hf.training.trainer import StageIILatentAlignmentTrainer

SMALL = dict(
    extractor_hidden_size=None, extractor_num_heads=4, latent_tokens_per_step=2, window_size=4, window_stride=2
)


@pytest.fixture(scope="module")
def plain_lm(tmp_path_factory) -> str:
    """A Qwen2 LM whose tokenizer has never seen the LaRe tokens (vocab = embedding rows, as a released LM)."""
    folder = tmp_path_factory.mktemp("plain-lm")
    state = json.loads(build_tiny_tokenizer()._tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] not in LARE_SPECIAL_TOKENS.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    assert "<|latent|>" not in tokenizer.get_vocab()
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory, tiny_parts) -> str:
    """The tiny CLIP encoder with SigLIP's normalisation (0.5 / 0.5), which must reach the model and processor."""
    root, _, _ = tiny_parts
    folder = tmp_path_factory.mktemp("vision")
    shutil.copytree(root / "clip", folder, dirs_exist_ok=True)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    preprocessor.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return str(folder)


def reasoning_records(count: int = 4):
    rows = {
        "id": [f"r{i}" for i in range(count)],
        "image": [make_image(200 + i) for i in range(count)],
        "question": ["Which digit is in the red square?"] * count,
        "rationale": [f"The red square holds the digit {i}." for i in range(count)],
        "answer": [str(i) for i in range(count)],
    }
    return records_from_dataset(datasets.Dataset.from_dict(rows))


def test_from_components_in_one_call_gives_a_model_and_processor_ready_to_train(
    tmp_path, tiny_parts, plain_lm, vision_dir
):
    _, clip, _ = tiny_parts
    model = LaReForConditionalGeneration.from_components(
        vision_dir, plain_lm, use_reconstructor=False, image_loss_weight=0.0, **SMALL
    )
    processor = LaReProcessor.from_components(vision_dir, plain_lm, latent_tokens_per_step=2)
    tokenizer = processor.tokenizer
    # the four tokens were added, in the same order (same ids) on both sides, and the embeddings resized to them
    for name, token in LARE_SPECIAL_TOKENS.items():
        assert tokenizer.convert_ids_to_tokens(getattr(model.config, f"{name}_id")) == token
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 1024
    assert processor.image_seq_length == model.config.image_seq_length == 64
    assert list(processor.image_processor.image_mean) == model.config.image_mean == [0.5, 0.5, 0.5]
    assert list(processor.image_processor.image_std) == model.config.image_std == [0.5, 0.5, 0.5]
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.testing.assert_close(
        model.model.vision_tower.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight
    )

    # ready to train: Trainer defaults (remove_unused_columns=True) with our collator
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("model.extractor.")}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)  # fmt: skip
    assert args.remove_unused_columns is True
    StageIILatentAlignmentTrainer.configure_model(model)
    trainer = StageIILatentAlignmentTrainer(
        model=model, args=args, train_dataset=reasoning_records(), data_collator=LaReDataCollator(processor)
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)

    inputs = processor.apply_chat_template(chat(make_image(1), "what is here?"), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    output = model.eval().generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_plain_trainer_with_default_columns_names_the_flag(tmp_path, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True)  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=reasoning_records(2), data_collator=LaReDataCollator(processor)
    )
    with pytest.raises(ValueError, match=r"remove_unused_columns=True.*remove_unused_columns=False.*LaReTrainer"):
        trainer.train()


def test_from_components_needs_a_tokenizer_for_a_loaded_lm(tiny_parts):
    root, _, lm = tiny_parts
    with pytest.raises(ValueError, match="pass tokenizer="):
        LaReForConditionalGeneration.from_components(str(root / "clip"), lm, use_reconstructor=False, **SMALL)


def test_build_without_reconstructor_loads_without_diffusers(tmp_path, tiny_parts, plain_lm):
    root, _, _ = tiny_parts
    out = tmp_path / "inference"
    assert main(["build", "--vision", str(root / "clip"), "--text", plain_lm, "--output", str(out),
                 "--no-reconstructor", "--set", "extractor_hidden_size=null", "extractor_num_heads=4",
                 "latent_tokens_per_step=2",
                 "window_size=4", "window_stride=2"]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["use_reconstructor"] is False and config["image_loss_weight"] == 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not [key for key in handle.keys() if key.startswith("reconstructor.")]
    image = tmp_path / "image.png"
    make_image(5).save(image)
    # diffusers made unimportable (as if not installed), for the installed package and for the Hub custom code
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["diffusers"] = None
        remote = sys.argv[1] == "remote"
        if remote:
            sys.modules["lare_hf"] = None
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        if not remote:
            import lare_hf
        model = AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=remote).eval()
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=remote)
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "what?"}}]}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=Image.open({str(image)!r}), return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
        assert "diffusers" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("generated", out.shape[1] - inputs["input_ids"].shape[1], type(model).__module__)
        """
    )
    for mode in ("package", "remote"):
        result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "generated 3" in result.stdout
    # the reconstructor itself says what is missing
    script = "import sys; sys.modules['diffusers'] = None\nfrom lare_hf.build import build_tiny\nbuild_tiny()"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "needs diffusers" in result.stderr and "--no-reconstructor" in result.stderr


def test_text_checkpoint_finds_gguf_files(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "model.Q4.gguf").write_bytes(b"")
    assert text_checkpoint(folder / "model.Q4.gguf") == (str(folder), {"gguf_file": "model.Q4.gguf"})
    assert text_checkpoint(folder) == (str(folder), {"gguf_file": "model.Q4.gguf"})
    assert text_checkpoint("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", {})
    (folder / "model.Q8.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        text_checkpoint(folder)
    (folder / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        text_checkpoint(folder / "weights.bin")
    (folder / "config.json").write_text("{}")
    assert text_checkpoint(folder) == (str(folder), {})  # a normal checkpoint folder wins


def test_model_card_on_save_names_components_license_and_citation(tmp_path, tiny_parts, plain_lm, vision_dir):
    Path(plain_lm, "README.md").write_text("---\nlicense: apache-2.0\n---\n# plain LM\n")
    Path(vision_dir, "README.md").write_text("---\nlicense: mit\n---\n# vision\n")
    try:
        model = LaReForConditionalGeneration.from_components(
            vision_dir, plain_lm, use_reconstructor=False, image_loss_weight=0.0, **SMALL
        )
    finally:
        Path(plain_lm, "README.md").unlink()
        Path(vision_dir, "README.md").unlink()
    assert model.config.components == {
        "vision": {"source": vision_dir, "license": "mit"},
        "text": {"source": plain_lm, "license": "apache-2.0"},
    }
    model.save_pretrained(tmp_path / "a")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.license == "other"  # the components' licenses differ
    assert f"| text | {plain_lm} | apache-2.0 |" in card.text and "@article{ma2025lare" in card.text
    assert card.data.base_model is None  # local folders are not Hub ids

    model.config.components = {
        "vision": {"source": "openai/clip-vit-large-patch14", "license": "mit"},
        "text": {"source": "Qwen/Qwen2.5-1.5B-Instruct", "license": "mit"},
    }
    model.save_pretrained(tmp_path / "b")
    card = ModelCard.load(tmp_path / "b" / "README.md")
    assert sorted(card.data.base_model) == ["Qwen/Qwen2.5-1.5B-Instruct", "openai/clip-vit-large-patch14"]
    assert card.data.license == "mit"

    # a README.md the user wrote is never overwritten, by save_pretrained or by `lare push`
    (tmp_path / "b" / "README.md").write_text("# my own card\n")
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "# my own card\n"
    assert main(["push", str(tmp_path / "b"), "--repo-id", "org/x", "--dry-run"]) == 0
    assert (tmp_path / "b" / "README.md").read_text() == "# my own card\n"
