"""The four training stages on Trainer, on the tiny preset: parameters, losses, resume, LoRA, multi-process, hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from conftest import chat, make_image
from lare_hf.configs import packaged_configs_dir
from lare_hf.hub import build_model_card, files_to_upload
from lare_hf.training.arguments import parse_train_arguments
from lare_hf.training.run import HISTORY_FILE, merge_lora, run_stage
from lare_hf.training.trainer import STAGE_TRAINERS, module_group


@pytest.fixture(scope="module")
def start_checkpoint(tiny_checkpoint) -> str:
    """Training reads it from disk and writes elsewhere, so the shared tiny checkpoint is the starting point."""
    return tiny_checkpoint


def stage_args(stage: int, model: str, data: str, output: Path, *extra: str):
    recipe = packaged_configs_dir() / "tiny" / f"stage{stage}.yaml"
    overrides = ["--model_name_or_path", model, "--train_file", data, "--output_dir", str(output),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
                 "--projector_lr", "1e-2", "--latent_lr", "1e-2", "--language_model_lr", "1e-2",
                 "--save_steps", "1000", *extra]  # fmt: skip
    return parse_train_arguments(str(recipe), overrides)


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "model.safetensors")


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_each_stage_changes_exactly_its_parameters(stage, start_checkpoint, reasoning_file, tmp_path):
    record = run_stage(*stage_args(stage, start_checkpoint, reasoning_file, tmp_path / "out"))
    before, after = weights(start_checkpoint), weights(tmp_path / "out")
    assert before.keys() == after.keys()
    trainable = STAGE_TRAINERS[stage].trainable_groups
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {
        name
        for name in before
        if module_group(name) in trainable and ".image_tokenizer." not in name
        # CLIP's last layer is never used (features come from layer -2), as in LLaVA
    }
    # nothing outside the stage's groups moves; inside them virtually everything does (a few LayerNorm gains of
    # the U-Net's cross-attention get gradients too small to move a float32 1.0 in two steps)
    assert changed <= expected, sorted(changed - expected)[:5]
    for group in trainable:
        members = {name for name in expected if module_group(name) == group}
        assert len(members & changed) >= 0.95 * len(members), (group, sorted(members - changed)[:5])
    assert record["global_steps"] == 2 and record["stage"] == stage
    logged = record["last_logged_losses"]
    assert "lm_loss" in logged
    if stage == 1:
        assert record["num_latent_steps"] == 0 and "alignment_loss" not in logged
    else:
        for name in ("alignment_loss", "image_reconstruction_loss", "text_reconstruction_loss"):
            assert name in logged and logged[name] > 0
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert [entry["stage"] for entry in history] == [stage]


def test_stage_with_latent_losses_needs_rationales(start_checkpoint, tmp_path):
    data = tmp_path / "no_rationale.jsonl"
    make_image(0).save(tmp_path / "a.png")
    data.write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="rationale"):
        run_stage(*stage_args(2, start_checkpoint, str(data), tmp_path / "out"))


def test_existing_checkpoints_are_never_overwritten(start_checkpoint, reasoning_file, tmp_path):
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already holds checkpoint.*checkpoint-2.*--resume"):
        run_stage(*stage_args(1, start_checkpoint, reasoning_file, tmp_path / "out"))


class Crash(TrainerCallback):
    """Simulates a killed run: raises right after the step-2 checkpoint was written."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt("simulated kill after checkpoint-2")


def test_resume_after_interruption_reaches_the_same_weights(start_checkpoint, reasoning_file, tmp_path, monkeypatch):
    extra = ("--max_steps", "4", "--save_steps", "2", "--seed", "3")
    run_stage(*stage_args(3, start_checkpoint, reasoning_file, tmp_path / "straight", *extra))

    from lare_hf.training import trainer as trainer_module

    original_init = trainer_module.LaReTrainer.__init__

    def init_with_crash(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Crash())

    monkeypatch.setattr(trainer_module.LaReTrainer, "__init__", init_with_crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage(*stage_args(3, start_checkpoint, reasoning_file, tmp_path / "resumed", *extra))
    monkeypatch.setattr(trainer_module.LaReTrainer, "__init__", original_init)
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    run_stage(*stage_args(3, start_checkpoint, reasoning_file, tmp_path / "resumed", *extra, "--resume", "True"))
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()  # the interrupted run's checkpoint is kept


def test_lora_adapters_save_merge_and_generate(start_checkpoint, reasoning_file, tmp_path):
    record = run_stage(*stage_args(3, start_checkpoint, reasoning_file, tmp_path / "lora", "--lora", "True"))
    counts = record["trainable_parameters"]
    assert record["lora"] and counts["lora_adapters"] > 0 and "language_model" not in counts
    assert counts["projector"] > 0 and counts["latent"] > 0  # fully trained next to the adapters
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    merged_dir = merge_lora(str(tmp_path / "lora"), str(tmp_path / "merged"))
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    base = weights(start_checkpoint)
    merged_weights = weights(merged_dir)
    assert merged_weights.keys() == base.keys()
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_weights[name], base[name])  # the adapter was merged in
    assert not torch.equal(
        merged_weights["model.extractor.state_proj.weight"], base["model.extractor.state_proj.weight"]
    )
    inputs = processor.apply_chat_template(
        chat(make_image(1), "Which digit?"), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(start_checkpoint), tmp_path / "lora"
    ).eval()
    via_peft = peft_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    via_merged = merged.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    assert via_peft.tolist() == via_merged.tolist()


def test_model_card_and_push_files(start_checkpoint, reasoning_file, tmp_path):
    run_stage(*stage_args(2, start_checkpoint, reasoning_file, tmp_path / "out", "--save_steps", "1"))
    (tmp_path / "out" / "eval_refocus_shapes.json").write_text(
        json.dumps(
            {
                "benchmark": "refocus_shapes",
                "accuracy": 12.5,
                "avg_tokens_correct": 3.0,
                "num_samples": 8,
                "num_latent_steps": 4,
            }
        )  # fmt: skip
    )
    files = files_to_upload(tmp_path / "out")
    assert {"model.safetensors", "config.json", "modeling_lare.py", "processor_config.json", "tokenizer.json"} <= set(
        files
    )
    assert not any(name.startswith("checkpoint-") or name.endswith("optimizer.pt") for name in files)
    written = (tmp_path / "out" / "README.md").read_text()  # `lare train` wrote the card, with this stage
    assert "| 2 | StageIILatentAlignmentTrainer | train.jsonl |" in written and "@article{ma2025lare" in written
    card = str(build_model_card(tmp_path / "out", "org/lare-tiny"))
    assert "pipeline_tag: image-text-to-text" in card
    assert "| 2 | StageIILatentAlignmentTrainer | train.jsonl |" in card
    assert "| refocus_shapes | 4 | 12.50 |" in card


@pytest.mark.slow
def test_two_process_ddp_run(start_checkpoint, reasoning_file, tmp_path):
    recipe = packaged_configs_dir() / "tiny" / "stage2.yaml"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lare_hf.cli", "train",
               "--config", str(recipe), "--model_name_or_path", start_checkpoint, "--train_file", reasoning_file,
               "--output_dir", str(tmp_path / "ddp"), "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--ddp_backend", "gloo"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["global_steps"] == 2
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


@pytest.mark.slow
def test_accelerate_ddp_run(start_checkpoint, reasoning_file, tmp_path):
    recipe = packaged_configs_dir() / "tiny" / "stage3.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(packaged_configs_dir() / "accelerate" / "ddp_cpu.yaml"), "-m", "lare_hf.cli", "train",
               "--config", str(recipe), "--model_name_or_path", start_checkpoint, "--train_file", reasoning_file,
               "--output_dir", str(tmp_path / "acc"), "--max_steps", "2", "--per_device_train_batch_size", "2"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["global_steps"] == 2 and record["stage"] == 3


@pytest.mark.slow
def test_all_four_stages_chain(start_checkpoint, reasoning_file, tmp_path):
    from lare_hf.cli import main

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for stage in (1, 2, 3, 4):
        text = (packaged_configs_dir() / "tiny" / f"stage{stage}.yaml").read_text()
        text = text.replace("outputs/tiny", str(tmp_path / "run")).replace("max_steps: 4", "max_steps: 2")
        (recipes / f"stage{stage}.yaml").write_text(text)
    code = main(["train", "--all", "--recipes", str(recipes), "--model", start_checkpoint,
                 "--train_file", reasoning_file])  # fmt: skip
    assert code == 0
    history = json.loads((tmp_path / "run" / "stage4" / HISTORY_FILE).read_text())
    assert [entry["stage"] for entry in history] == [1, 2, 3, 4]
    assert history[1]["started_from"] == str(tmp_path / "run" / "stage1")


def test_gradient_accumulation_scales_every_term_alike(start_checkpoint, reasoning_file, tmp_path):
    """Trainer divides the whole Eq. 10 loss by the accumulation steps (the model takes no loss kwargs), so each
    term's gradient is scaled by the same factor."""
    from lare_hf.data.collator import LaReDataCollator
    from lare_hf.data.formats import load_records
    from lare_hf.training.trainer import StageIIIInstructionTrainer

    _, _, args = stage_args(3, start_checkpoint, reasoning_file, tmp_path / "ga", "--gradient_accumulation_steps", "4")
    model = AutoModelForImageTextToText.from_pretrained(start_checkpoint)
    processor = AutoProcessor.from_pretrained(start_checkpoint)
    StageIIIInstructionTrainer.configure_model(model)
    collator = LaReDataCollator(processor=processor, num_latent_steps=4)
    records = load_records(reasoning_file)
    trainer = StageIIIInstructionTrainer(model=model, args=args, train_dataset=records, data_collator=collator)
    assert trainer.model_accepts_loss_kwargs is False
    batch = collator([records[0], records[1]])
    trainer.current_gradient_accumulation_steps = 4  # what train() sets for a full accumulation window
    model.train()
    torch.manual_seed(0)
    model.image_loss_draws = 0  # the same L_img noise in both (`noise_seeds`)
    trainer.training_step(model, dict(batch))
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(0)
    model.image_loss_draws = 0
    model(**batch, compute_latent_losses=True).loss.backward()
    for name, grad in accumulated.items():
        torch.testing.assert_close(grad * 4, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
