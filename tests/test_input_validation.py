"""Bad input gets a clear error, and nothing a user wrote is overwritten (issue 11).

Each case gives bad input to one boundary (config, processor / chat template, model forward / generate, checkpoints,
data, command line) and asserts the exception type and the words of the message that tell the user what to fix.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import chat, make_image
from lare_hf.build import build_tiny
from lare_hf.cli import main
from lare_hf.configs import packaged_configs_dir
from lare_hf.data.formats import MalformedLineError, MalformedRecordError, load_records
from lare_hf.destinations import last_complete_checkpoint
from lare_hf.modeling.configuration_lare import LaReConfig
from lare_hf.training.arguments import parse_train_arguments
from lare_hf.training.run import run_stage


@dataclass
class Context:
    tmp_path: Path
    checkpoint: str
    data: Path  # a folder with train.jsonl (4 reasoning records) and images/


@pytest.fixture(scope="module")
def reasoning_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validation-data")
    (root / "images").mkdir()
    with open(root / "train.jsonl", "w") as handle:
        for index in range(4):
            make_image(index).save(root / "images" / f"{index}.png")
            record = {
                "id": f"r{index}",
                "image": f"images/{index}.png",
                "question": "Which digit?",
                "rationale": "The red square holds the digit one.",
                "answer": "1",
            }
            handle.write(json.dumps(record) + "\n")
    return root


@pytest.fixture
def ctx(tmp_path, tiny_checkpoint, reasoning_data) -> Context:
    return Context(tmp_path=tmp_path, checkpoint=tiny_checkpoint, data=reasoning_data)


def stage_args(ctx: Context, output: Path, *extra: str, stage: int = 3):
    overrides = ["--model_name_or_path", ctx.checkpoint, "--train_file", str(ctx.data / "train.jsonl"),
                 "--output_dir", str(output), "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--save_steps", "1000", *extra]  # fmt: skip
    return parse_train_arguments(str(packaged_configs_dir() / "tiny" / f"stage{stage}.yaml"), overrides)


def digest(folder: Path) -> dict[str, str]:
    """Content hash of every file under `folder` (to show nothing was touched)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def finished_model(ctx: Context, name: str = "finished") -> Path:
    """A folder holding a finished model (what `lare train` leaves in output_dir), no checkpoint-N."""
    folder = ctx.tmp_path / name
    shutil.copytree(ctx.checkpoint, folder)
    (folder / "lare_training_history.json").write_text("[]")
    return folder


def run_case(case, ctx: Context | None, error: type[BaseException], words: tuple[str, ...]) -> None:
    with pytest.raises(error) as raised:
        case(ctx)
    message = str(raised.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------------------------
# 1. LaReConfig: types, ranges, consistency; unknown keys suggest the closest valid name

CONFIG_CASES = [
    ("negative-loss-weight", dict(sym_loss_weight=-1.0), ("sym_loss_weight", ">= 0", "-1.0", "Use 0")),
    ("nan-loss-weight", dict(image_loss_weight=math.nan), ("image_loss_weight", "finite")),
    ("fractional-K", dict(num_latent_steps=2.5), ("num_latent_steps", "integer", "2.5")),
    ("K-above-max", dict(num_latent_steps=20), ("num_latent_steps", "20", "max_latent_steps=16")),
    ("window-larger-than-grid", dict(window_size=32), ("window_size=32", "window_size <= 16")),
    ("window-as-string", dict(window_size="3"), ("window_size", "integer", "'3'")),
    ("zero-stride", dict(window_stride=0), ("window_stride", ">= 1", "got 0")),
    ("zero-latent-tokens", dict(latent_tokens_per_step=0), ("latent_tokens_per_step", ">= 1")),
    ("heads-not-dividing", dict(extractor_num_heads=7), ("extractor_num_heads=7", "divisible", "1536")),
    ("activation-typo", dict(projector_hidden_act="gleu"), ("projector_hidden_act='gleu'", "did you mean 'gelu'")),
    ("bool-as-string", dict(use_extractor="yes"), ("use_extractor", "true or false", "'yes'")),
    ("zero-temperature", dict(alignment_temperature=0.0), ("alignment_temperature", "> 0.0")),
    ("zero-std", dict(image_std=[0.26, 0.0, 0.27]), ("image_std[1]", "> 0.0")),
    ("two-channel-mean", dict(image_mean=[0.5, 0.5]), ("image_mean", "3 values")),
    ("saliency-layer-out-of-range", dict(saliency_layers=[99]), ("saliency_layers entry 99", "-28 ... 27")),
    ("vision-layer-out-of-range", dict(vision_feature_layer=40), ("vision_feature_layer", "-25 and 24")),
    ("beta-end-below-start", dict(diffusion_beta_start=0.1, diffusion_beta_end=0.01), ("diffusion_beta_end",)),
    ("negative-token-id", dict(image_token_id=-5), ("image_token_id", ">= 0")),
]


@pytest.mark.parametrize("kwargs,words", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_field_errors(kwargs: dict[str, Any], words: tuple[str, ...]):
    with pytest.raises(ValueError) as raised:
        LaReConfig(**kwargs)
    for word in words:
        assert word in str(raised.value), f"{word!r} not in {raised.value}"


def _override_typo(ctx):
    LaReConfig.check_field_names({"windw_size": 3})


def _build_override_typo(ctx):
    build_tiny(overrides={"windw_size": 3})


def _recipe_typo(ctx):
    recipe = ctx.tmp_path / "recipe.yaml"
    recipe.write_text("stage: 2\nlearnig_rate: 0.001\n")
    parse_train_arguments(str(recipe), ["--model_name_or_path", "m", "--train_file", "t"])


def _flag_typo(ctx):
    parse_train_arguments(None, ["--model_name_or_path", "m", "--train_file", "t", "--num_latent_step", "2"])


def _model_overrides_typo(ctx):
    run_stage(*stage_args(ctx, ctx.tmp_path / "out", "--model_overrides", '{"sym_los_weight": 0.5}'))


def _model_overrides_negative(ctx):
    run_stage(*stage_args(ctx, ctx.tmp_path / "out", "--model_overrides", '{"image_loss_weight": -0.9}'))


def _model_overrides_not_json(ctx):
    run_stage(*stage_args(ctx, ctx.tmp_path / "out", "--model_overrides", "sym_loss_weight=0.5"))


def _model_overrides_architecture(ctx):
    run_stage(*stage_args(ctx, ctx.tmp_path / "out", "--model_overrides", '{"window_size": 2}'))


OVERRIDE_CASES = [
    ("set-typo", _override_typo, ValueError, ("'windw_size'", "did you mean 'window_size'")),
    ("build-override-typo", _build_override_typo, ValueError, ("'windw_size'", "did you mean 'window_size'")),
    ("recipe-typo", _recipe_typo, ValueError, ("recipe.yaml", "'learnig_rate'", "did you mean 'learning_rate'")),
    ("train-flag-typo", _flag_typo, ValueError, ("'num_latent_step'", "did you mean 'num_latent_steps'")),
    ("model-overrides-typo", _model_overrides_typo, ValueError, ("'sym_los_weight'", "'sym_loss_weight'")),
    ("model-overrides-negative", _model_overrides_negative, ValueError, ("image_loss_weight", ">= 0", "Use 0")),
    ("model-overrides-not-json", _model_overrides_not_json, ValueError, ("JSON object", "sym_loss_weight=0.5")),
    ("model-overrides-architecture", _model_overrides_architecture, ValueError, ("window_size", "lare build --set")),
]


@pytest.mark.parametrize("case,error,words", [c[1:] for c in OVERRIDE_CASES], ids=[c[0] for c in OVERRIDE_CASES])
def test_config_override_errors(case, error, words, ctx):
    run_case(case, ctx, error, words)


# ---------------------------------------------------------------------------------------------------------------
# 6. command line: one line `error: ...`, exit code 2; nothing written over a non-empty destination


def _non_empty(ctx: Context, name: str = "dest") -> Path:
    folder = ctx.tmp_path / name
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    return folder


def _cli_build_onto_checkpoint(ctx):
    existing = finished_model(ctx)
    return ["build", "--preset", "tiny", "--output", str(existing)], existing


def _cli_build_non_empty(ctx):
    folder = _non_empty(ctx)
    return ["build", "--preset", "tiny", "--output", str(folder)], folder


def _cli_synth_non_empty(ctx):
    folder = _non_empty(ctx)
    return ["data", "synth", "--output", str(folder), "--num-train", "2", "--num-test", "1"], folder


def _cli_merge_non_empty(ctx):
    folder = _non_empty(ctx)
    return ["merge", "--adapter", ctx.checkpoint, "--output", str(folder)], folder


def _cli_demo_non_empty(ctx):
    folder = _non_empty(ctx)
    return ["demo", "--output", str(folder), "--quick"], folder


def _train_argv(ctx: Context, output: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(packaged_configs_dir() / "tiny" / "stage2.yaml"), "--model", ctx.checkpoint,
            "--train_file", str(ctx.data / "train.jsonl"), "--output_dir", str(output), "--max_steps", "1", *extra]  # fmt: skip


def _cli_train_onto_finished_model(ctx):
    existing = finished_model(ctx)
    return _train_argv(ctx, existing), existing


def _cli_train_onto_checkpoints(ctx):
    output = ctx.tmp_path / "run"
    (output / "checkpoint-4").mkdir(parents=True)
    (output / "checkpoint-4" / "trainer_state.json").write_text("{}")
    return _train_argv(ctx, output), output


def _cli_resume_finished_model(ctx):
    existing = finished_model(ctx)
    return _train_argv(ctx, existing, "--resume", "True"), existing


CLI_WRITE_CASES = [
    ("build-onto-checkpoint", _cli_build_onto_checkpoint, ("lare build --output", "not empty", "--overwrite")),
    ("build-non-empty", _cli_build_non_empty, ("not empty", "nothing was written", "--overwrite")),
    ("synth-non-empty", _cli_synth_non_empty, ("lare data synth --output", "--overwrite")),
    ("merge-non-empty", _cli_merge_non_empty, ("merge output", "--overwrite")),
    ("demo-non-empty", _cli_demo_non_empty, ("lare demo --output", "--overwrite")),
    ("train-onto-finished-model", _cli_train_onto_finished_model, ("finished model", "--overwrite True")),
    ("train-onto-checkpoints", _cli_train_onto_checkpoints, ("checkpoint-4", "--resume True")),
    ("resume-finished-model", _cli_resume_finished_model, ("no complete checkpoint", "--overwrite True")),
]


@pytest.mark.parametrize("case,words", [c[1:] for c in CLI_WRITE_CASES], ids=[c[0] for c in CLI_WRITE_CASES])
def test_cli_refuses_to_overwrite(case, words, ctx, capsys):
    argv, destination = case(ctx)
    before = digest(destination)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert digest(destination) == before  # byte-identical


def _cli_set_typo(ctx):
    return ["build", "--preset", "tiny", "--output", str(ctx.tmp_path / "new"), "--set", "windw_size=3"]


def _cli_set_without_value(ctx):
    return ["build", "--preset", "tiny", "--output", str(ctx.tmp_path / "new"), "--set", "window_size"]


def _cli_missing_image(ctx):
    return ["generate", "--model", ctx.checkpoint, "--image", str(ctx.tmp_path / "nope.png"), "--prompt", "hi"]


def _cli_unreadable_image(ctx):
    fake = ctx.tmp_path / "fake.png"
    fake.write_text("not a picture")
    return ["generate", "--model", ctx.checkpoint, "--image", str(fake), "--prompt", "hi"]


def _cli_missing_train_file(ctx):
    argv = _train_argv(ctx, ctx.tmp_path / "out")
    argv[argv.index("--train_file") + 1] = str(ctx.tmp_path / "missing.jsonl")
    return argv


def _cli_missing_recipes(ctx):
    return ["train", "--all", "--recipes", str(ctx.tmp_path / "no-recipes"), "--model", ctx.checkpoint]


def _cli_train_flag_typo(ctx):
    return _train_argv(ctx, ctx.tmp_path / "out", "--learnig_rate", "1e-3")


def _cli_vision_without_text(ctx):
    return ["build", "--vision", ctx.checkpoint, "--output", str(ctx.tmp_path / "new")]


CLI_ERROR_CASES = [
    ("set-typo", _cli_set_typo, ("'windw_size'", "did you mean 'window_size'")),
    ("set-without-value", _cli_set_without_value, ("--set expects key=value", "'window_size'")),
    ("missing-image", _cli_missing_image, ("--image", "nope.png", "does not exist")),
    ("unreadable-image", _cli_unreadable_image, ("--image", "fake.png", "not a readable image")),
    ("missing-train-file", _cli_missing_train_file, ("missing.jsonl", "does not exist")),
    ("missing-recipes", _cli_missing_recipes, ("--recipes", "stage1.yaml")),
    ("train-flag-typo", _cli_train_flag_typo, ("'learnig_rate'", "did you mean 'learning_rate'")),
    ("vision-without-text", _cli_vision_without_text, ("--vision and --text go together",)),
]


@pytest.mark.parametrize("case,words", [c[1:] for c in CLI_ERROR_CASES], ids=[c[0] for c in CLI_ERROR_CASES])
def test_cli_prints_one_error_line(case, words, ctx, capsys):
    argv = case(ctx)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


def test_cli_debug_shows_the_exception(ctx):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        main(["--debug", *_cli_missing_image(ctx)])


def test_cli_overwrite_writes_into_a_non_empty_folder(ctx, capsys):
    folder = _non_empty(ctx)
    assert main(["build", "--preset", "tiny", "--output", str(folder), "--overwrite"]) == 0
    assert (folder / "model.safetensors").is_file() and (folder / "notes.txt").is_file()


# ---------------------------------------------------------------------------------------------------------------
# 4. training: atomic checkpoints, --resume from the last complete one, non-finite loss stops the run


class KilledWhileSaving(Exception):
    pass


def test_checkpoint_killed_mid_save_is_never_picked(ctx, monkeypatch):
    from lare_hf.training.trainer import LaReTrainer

    output = ctx.tmp_path / "run"
    original = LaReTrainer._save_rng_state

    def killed_at_step_2(self, output_dir):
        if self.state.global_step == 2:  # model and optimizer are written, the rest is not
            raise KilledWhileSaving(output_dir)
        return original(self, output_dir)

    monkeypatch.setattr(LaReTrainer, "_save_rng_state", killed_at_step_2)
    with pytest.raises(KilledWhileSaving):
        run_stage(*stage_args(ctx, output, "--max_steps", "3", "--save_steps", "1"))
    monkeypatch.setattr(LaReTrainer, "_save_rng_state", original)
    assert (output / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (output / "checkpoint-2").exists()  # the half-written one never got its final name
    # an exception mid-save removes its staging folder (a SIGKILL leaves it: see test_robustness's kill points)
    assert not (output / ".partial-checkpoint-2").exists()
    assert last_complete_checkpoint(output) == output / "checkpoint-1"
    kept = digest(output / "checkpoint-1")

    record = run_stage(*stage_args(ctx, output, "--max_steps", "3", "--save_steps", "1", "--resume", "True"))
    assert record["global_steps"] == 3
    assert digest(output / "checkpoint-1") == kept
    assert (output / "checkpoint-2" / "trainer_state.json").is_file() and (output / "model.safetensors").is_file()
    assert not (output / ".partial-checkpoint-2").exists()


def test_resume_skips_an_incomplete_checkpoint_folder(ctx):
    output = ctx.tmp_path / "run"
    run_stage(*stage_args(ctx, output, "--max_steps", "1", "--save_steps", "1"))
    (output / "checkpoint-7").mkdir()  # e.g. written by a tool that died before trainer_state.json
    assert last_complete_checkpoint(output) == output / "checkpoint-1"


def test_non_finite_loss_stops_naming_step_and_term(ctx):
    output = ctx.tmp_path / "run"
    huge = ("--learning_rate", "1e30", "--projector_lr", "1e30", "--latent_lr", "1e30", "--language_model_lr",
            "1e30", "--warmup_steps", "0", "--max_grad_norm", "0", "--max_steps", "4", "--save_steps", "1")  # fmt: skip
    with pytest.raises(FloatingPointError) as raised:
        run_stage(*stage_args(ctx, output, *huge))
    message = str(raised.value)
    assert "Training stopped at step 2" in message and "lm_loss=nan" in message
    assert f"checkpoint {output / 'checkpoint-1'} is intact" in message and "--resume True" in message
    assert (output / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (output / "model.safetensors").exists()  # no poisoned final model


# ---------------------------------------------------------------------------------------------------------------
# 4. checkpoints: a broken weight file is named; a config of another model type says so


def _copy_with_config(ctx: Context, **changes) -> Path:
    folder = ctx.tmp_path / "ckpt"
    shutil.copytree(ctx.checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _truncated_weights(ctx):
    from transformers import AutoModelForImageTextToText

    folder = ctx.tmp_path / "ckpt"
    shutil.copytree(ctx.checkpoint, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    AutoModelForImageTextToText.from_pretrained(folder)


def _garbage_weights(ctx):
    from lare_hf.modeling import LaReForConditionalGeneration

    folder = ctx.tmp_path / "ckpt"
    shutil.copytree(ctx.checkpoint, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    LaReForConditionalGeneration.from_pretrained(folder)


def _config_of_other_model(ctx):
    LaReConfig.from_pretrained(_copy_with_config(ctx, model_type="llama"))


def _model_type_typo_cli(ctx):
    from lare_hf.destinations import check_lare_checkpoint

    check_lare_checkpoint(_copy_with_config(ctx, model_type="lrae"), "--model")


def _other_model_cli(ctx):
    from lare_hf.destinations import check_lare_checkpoint

    check_lare_checkpoint(_copy_with_config(ctx, model_type="llama"), "--model")


def _train_from_folder_without_config(ctx):
    folder = ctx.tmp_path / "empty-model"
    folder.mkdir()
    args = stage_args(ctx, ctx.tmp_path / "out")
    args[0].model_name_or_path = str(folder)
    run_stage(*args)


def _train_from_missing_model(ctx):
    args = stage_args(ctx, ctx.tmp_path / "out")
    args[0].model_name_or_path = str(ctx.tmp_path / "no-such-model")
    run_stage(*args)


def _config_not_json(ctx):
    from lare_hf.destinations import check_lare_checkpoint

    folder = ctx.tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "lare",')
    check_lare_checkpoint(folder)


CHECKPOINT_CASES = [
    ("truncated-weights", _truncated_weights, OSError, ("model.safetensors", "corrupt or truncated", "save it again")),
    ("garbage-weights", _garbage_weights, OSError, ("model.safetensors", "corrupt or truncated")),
    ("config-of-other-model", _config_of_other_model, ValueError, ("model_type='llama'", "not 'lare'", "lare build")),
    ("model-type-typo", _model_type_typo_cli, ValueError, ("'lrae'", "did you mean 'lare'", "config.json")),
    ("other-model-checkpoint", _other_model_cli, ValueError, ("'llama' checkpoint", "not a LaRe one", "lare build")),
    ("folder-without-config", _train_from_folder_without_config, FileNotFoundError, ("no config.json", "lare build")),
    ("missing-model", _train_from_missing_model, FileNotFoundError, ("no-such-model", "does not exist")),
    ("config-not-json", _config_not_json, ValueError, ("config.json", "not valid JSON")),
]


@pytest.mark.parametrize("case,error,words", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_errors(case, error, words, ctx):
    run_case(case, ctx, error, words)


def test_model_type_typo_never_suggests_trust_remote_code(ctx, capsys):
    folder = _copy_with_config(ctx, model_type="lrae")
    image = ctx.data / "images" / "0.png"
    assert main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lare'" in err and "trust_remote_code" not in err


# ---------------------------------------------------------------------------------------------------------------
# 2. processor and chat template: messages, roles, content parts, images, empty text, prompt length


def _message(*parts, role: str = "user") -> list[dict]:
    return [{"role": role, "content": list(parts)}]


TEXT = {"type": "text", "text": "Which digit?"}


def _fresh(processor):
    """A processor of its own, for cases that change attributes (the session's processor stays as it is)."""
    return copy.deepcopy(processor)


PROCESSOR_CASES = [
    ("empty-message-list", lambda m, p: p.apply_chat_template([]), ValueError, ("empty list of messages",)),
    ("message-not-a-dict", lambda m, p: p.apply_chat_template(["hi"]), ValueError,
     ("message 0", "'role' and 'content'", "str 'hi'")),
    ("unknown-role", lambda m, p: p.apply_chat_template(_message(TEXT, role="robot")), ValueError,
     ("role 'robot'", "'system', 'user', 'assistant'")),
    ("unknown-content-type", lambda m, p: p.apply_chat_template(_message({"type": "video"}, TEXT)), ValueError,
     ("content part 0", "type 'video'", "'text' and 'image'")),
    ("text-part-not-a-string", lambda m, p: p.apply_chat_template(_message({"type": "text", "text": 5})),
     ValueError, ("content part 0", "'text' is int 5", "give a string")),
    ("content-not-a-list", lambda m, p: p.apply_chat_template([{"role": "user", "content": 5}]), ValueError,
     ("content int 5", "a string or a list")),
    ("non-image-object-in-message", lambda m, p: p.apply_chat_template(_message({"type": "image", "image": 3}, TEXT)),
     ValueError, ("image=int 3", "not an image", "PIL image")),
    ("empty-message-content", lambda m, p: p.apply_chat_template(_message({"type": "text", "text": "  "})),
     ValueError, ("no text and no image", "question")),
    ("non-image-object-in-call", lambda m, p: p(images=[42], text="<|image|>Which?"), ValueError,
     ("`images` holds int 42", "not an image")),
    ("empty-prompt", lambda m, p: p(text=""), ValueError, ("`text` entry 0 is empty",)),
    ("empty-prompt-list", lambda m, p: p(text=[]), ValueError, ("`text` is an empty list",)),
    ("pre-tokenized-text", lambda m, p: p(text=[[1, 2]]), ValueError, ("string or a list of strings",)),
    ("K-as-call-argument", lambda m, p: p(text="hi", num_latent_steps=2), TypeError,
     ("takes no num_latent_steps", "apply_chat_template(..., num_latent_steps=K)")),
    ("negative-K-in-template", lambda m, p: p.apply_chat_template(_message(TEXT), num_latent_steps=-1), ValueError,
     ("num_latent_steps must be >= 0", "-1")),
    ("fractional-K-attribute", lambda m, p: setattr(_fresh(p), "num_latent_steps", 2.5), ValueError,
     ("num_latent_steps", "integer", "2.5")),
    ("images-without-placeholders", lambda m, p: p(images=[make_image(0)], text="no placeholder"), ValueError,
     ("should be the same as the number of images", "0 <|image|> placeholder(s)", "1 image(s)")),
    ("tokenizer-template-unknown-role", lambda m, p: p.tokenizer.apply_chat_template(_message(TEXT, role="bot")),
     jinja2.TemplateError, ("Unknown chat role bot", "'user'")),
    ("prompt-longer-than-tokenizer-allows", lambda m, p: _too_long_for_tokenizer(p), ValueError,
     ("tokens", "at most 40", "model_max_length", "Shorten the prompt")),
    ("nan-pixels-in-array", lambda m, p: p(images=[np.full((8, 8, 3), np.nan, np.float32)], text="<|image|>Which?"),
     ValueError, ("`images`", "NaN or infinite pixels")),
    ("int-array-out-of-range", lambda m, p: p(images=[np.full((8, 8), 300, np.int64)], text="<|image|>Which?"),
     ValueError, ("`images`", "[300, 300]", "[0, 255]")),
    ("five-channel-array", lambda m, p: p(images=[np.zeros((8, 8, 5), np.uint8)], text="<|image|>Which?"),
     ValueError, ("`images`", "shape (8, 8, 5)", "C = 1, 3 or 4")),
    ("batch-of-1-and-2-images", lambda m, p: _one_and_two_images(p, padding=True), ValueError,
     ("Prompt 1 has 2 images", "LaRe takes one image per prompt", "num_latent_steps=0")),
    ("batch-of-1-and-2-images-unpadded", lambda m, p: _one_and_two_images(p), ValueError,
     ("Prompt 1 has 2 images", "LaRe takes one image per prompt")),
    ("training-batch-of-1-and-2-images", lambda m, p: p.build_training_inputs(_ONE_AND_TWO, ["1", "2"]),
     ValueError, ("Prompt 1 has 2 images", "one image per prompt")),
    ("batch-of-different-lengths-unpadded", lambda m, p: p.apply_chat_template(
        [chat(make_image(0), "Which?"), chat(make_image(1), "Which digit is in the red square?")],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"), ValueError,
     ("2 prompts of this batch have different lengths", "padding=True")),
]  # fmt: skip

_ONE_AND_TWO = [
    chat(make_image(0), "Which digit?"),
    _message({"type": "image", "image": make_image(1)}, {"type": "image", "image": make_image(2)}, TEXT),
]


def _one_and_two_images(processor, **kwargs):
    processor.apply_chat_template(
        _ONE_AND_TWO, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


def test_array_images_match_their_pil_equivalents(tiny_model_and_processor):
    """Grey [H, W] arrays, channels-first tensors, uint16, bool and float arrays give the pixels of the PIL image they
    describe (the image processor alone refuses a 2D array and clips or misreads the others)."""
    _, processor = tiny_model_and_processor
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    cases = [
        (grey, Image.fromarray(grey).convert("RGB")),
        (torch.from_numpy(rgb).permute(2, 0, 1), Image.fromarray(rgb)),
        (grey.astype(np.uint16) * 257, Image.fromarray(grey).convert("RGB")),
        (rgb.astype(np.float32) / 255, Image.fromarray(rgb)),
        (grey > 127, Image.fromarray(np.where(grey > 127, 255, 0).astype(np.uint8)).convert("RGB")),
    ]
    for array, image in cases:
        from_array = processor(images=[array], text="<|image|>Which?")["pixel_values"]
        from_image = processor(images=[image], text="<|image|>Which?")["pixel_values"]
        torch.testing.assert_close(from_array, from_image, msg=str(type(array)))


def test_multi_image_prompts_without_latent_steps_run(tiny_model_and_processor):
    """Several images in a prompt are fine without latent steps (K=0): the model reads them as LLaVA does."""
    model, processor = tiny_model_and_processor
    inputs = processor.apply_chat_template(_ONE_AND_TWO, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True}, num_latent_steps=0)  # fmt: skip
    assert inputs["pixel_values"].shape[0] == 3
    output = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2)
    assert output.shape == (2, inputs["input_ids"].shape[1] + 2)


def _too_long_for_tokenizer(processor):
    processor = _fresh(processor)
    processor.tokenizer.model_max_length = 40
    processor.apply_chat_template(chat(make_image(0), "Which digit?"), add_generation_prompt=True, tokenize=True)


@pytest.mark.parametrize("case,error,words", [c[1:] for c in PROCESSOR_CASES], ids=[c[0] for c in PROCESSOR_CASES])
def test_processor_errors(case, error, words, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    run_case(lambda _: case(model, processor), None, error, words)


def test_high_bit_depth_and_palette_images_are_converted_not_clipped(tiny_model_and_processor, tmp_path):
    """A 16-bit grey PNG and a palette PNG give the pixels of their 8-bit RGB equivalents (PIL's own convert would
    clip the 16-bit one to white)."""
    _, processor = tiny_model_and_processor
    grey16 = Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16))  # 30000 / 257 -> 116.7
    grey8 = Image.new("RGB", (64, 64), (117, 117, 117))
    palette = make_image(3).convert("P")

    def pixels(image):
        text = processor.apply_chat_template(chat(image, "q"), add_generation_prompt=True)
        return processor(images=[image], text=text, return_tensors="pt")["pixel_values"]

    assert grey16.mode.startswith("I;16") and grey16.convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    torch.testing.assert_close(pixels(grey16), pixels(grey8), atol=0.02, rtol=0)
    torch.testing.assert_close(pixels(palette), pixels(palette.convert("RGB")))
    # the data loader and `lare generate` use the same conversion
    grey16.save(tmp_path / "grey16.png")
    record = {"id": "g", "image": "grey16.png", "question": "q", "rationale": "r", "answer": "a"}
    (tmp_path / "grey.jsonl").write_text(json.dumps(record) + "\n")
    loaded = load_records(str(tmp_path / "grey.jsonl"))[0]["image"]
    assert loaded.mode == "RGB" and abs(loaded.getpixel((0, 0))[0] - 117) <= 1


# ---------------------------------------------------------------------------------------------------------------
# 3. model forward / generate: pixels, shapes against input_ids, unknown keyword arguments, labels, rationale


def _inputs(processor, batch: int = 1):
    texts = [processor.apply_chat_template(chat(make_image(i), "Which digit?"), add_generation_prompt=True)
             for i in range(batch)]  # fmt: skip
    return dict(processor(images=[make_image(i) for i in range(batch)], text=texts, return_tensors="pt"))


def _with(processor, **changes):
    inputs = _inputs(processor)
    for name, change in changes.items():
        inputs[name] = change(inputs)
    return inputs


def _forward(**changes):
    def case(model, processor):
        with torch.no_grad():
            model(**_with(processor, **changes))

    return case


def _forward_kwargs(**kwargs):
    def case(model, processor):
        with torch.no_grad():
            model(**_inputs(processor), **kwargs)

    return case


def _labels(change):
    def case(model, processor):
        inputs = _inputs(processor)
        with torch.no_grad():
            model(**inputs, labels=change(inputs["input_ids"]))

    return case


def _rationale(ids_rows: int, mask_columns: int | None = None):
    def case(model, processor):
        inputs = _inputs(processor, batch=2)
        rationale = torch.full((ids_rows, 6), 10)
        mask = torch.ones(ids_rows, mask_columns or 6, dtype=torch.long)
        with torch.no_grad():
            model(**inputs, rationale_input_ids=rationale, rationale_attention_mask=mask)

    return case


def _generate(**kwargs):
    def case(model, processor):
        model.generate(**_inputs(processor), max_new_tokens=2, **kwargs)

    return case


MODEL_CASES = [
    ("uint8-pixels", _forward(pixel_values=lambda x: (x["pixel_values"] * 60 + 120).clamp(0, 255).to(torch.uint8)),
     ValueError, ("pixel_values has dtype torch.uint8", "through the processor")),
    ("0-255-float-pixels", _forward(pixel_values=lambda x: (x["pixel_values"] * 60 + 120).clamp(0, 255)),
     ValueError, ("raw 0-255 pixels", "through the processor")),
    ("nan-pixels", _forward(pixel_values=lambda x: x["pixel_values"].masked_fill(torch.rand(x["pixel_values"].shape) < 0.1, math.nan)),
     ValueError, ("pixel_values contains NaN or infinite",)),
    ("pixels-of-another-size", _forward(pixel_values=lambda x: torch.zeros(1, 3, 32, 32)), ValueError,
     ("pixel_values has images of (32, 32) pixels", "64x64")),
    ("pixels-3d", _forward(pixel_values=lambda x: x["pixel_values"][0]), ValueError,
     ("pixel_values must have 4 dimensions",)),
    ("attention-mask-longer", _forward(attention_mask=lambda x: torch.ones(1, x["input_ids"].shape[1] + 3, dtype=torch.long)),
     ValueError, ("attention_mask has shape", "it must have shape (1, ")),
    ("attention-mask-other-batch", _forward(attention_mask=lambda x: x["attention_mask"].repeat(2, 1)), ValueError,
     ("attention_mask has shape (2, ", "1 row(s)")),
    ("position-ids-shape", _forward(position_ids=lambda x: torch.arange(5)[None]), ValueError,
     ("position_ids has shape (1, 5)", "leave it None")),
    ("float-input-ids", _forward(input_ids=lambda x: x["input_ids"].float()), ValueError,
     ("input_ids must hold integer ids", "torch.float32")),
    ("ids-outside-vocab", _forward(input_ids=lambda x: x["input_ids"].masked_fill(x["input_ids"] == 10, 10**6)),
     ValueError, ("input_ids holds ids outside the vocabulary", "1000000", "resize_token_embeddings")),
    ("K-given-to-forward", _forward_kwargs(num_latent_steps=0), TypeError,
     ("unexpected keyword argument 'num_latent_steps'", "generate(..., num_latent_steps=K)")),
    ("typo-in-forward-kwarg", _forward_kwargs(output_attention=True), TypeError,
     ("unexpected keyword argument 'output_attention'", "did you mean 'output_attentions'")),
    ("labels-outside-vocab", _labels(lambda ids: torch.full_like(ids, 10**6)), ValueError,
     ("labels holds ids outside the vocabulary", "-100")),
    ("labels-of-another-shape", _labels(lambda ids: ids[:, :-1]), ValueError,
     ("labels has shape", "one label per input position")),
    ("rationale-of-another-batch", _rationale(1), ValueError,
     ("rationale_input_ids has 1 rows but the batch has 2",)),
    ("rationale-mask-shape", _rationale(2, mask_columns=4), ValueError,
     ("rationale_attention_mask has shape (2, 4)", "(2, 6)")),
    ("generate-unknown-kwarg", _generate(windw=3), ValueError, ("['windw']", "not used by the model")),
    ("generate-fractional-K", _generate(num_latent_steps=2.5), ValueError,
     ("num_latent_steps must be an integer", "2.5")),
    ("generate-assisted", _generate(prompt_lookup_num_tokens=2), ValueError, ("prompt_lookup_num_tokens", "not supported")),
]  # fmt: skip


@pytest.mark.parametrize("case,error,words", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model_errors(case, error, words, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    run_case(lambda _: case(model, processor), None, error, words)


def test_a_prompt_longer_than_the_model_runs_and_warns(tiny_model_and_processor, caplog):
    """As transformers' decoders do, positions past max_position_embeddings run (RoPE extrapolates; RoPE-scaling
    configs go there on purpose), with a warning that names the limit and the fix."""
    model, _ = tiny_model_and_processor
    limit = model.config.text_config.max_position_embeddings
    logging.Logger.warning_once.cache_clear()  # said once per process
    with caplog.at_level(logging.WARNING, logger="lare_hf"), torch.no_grad():
        logits = model(input_ids=torch.full((1, limit + 1), 10)).logits
    assert logits.shape[1] == limit + 1 and torch.isfinite(logits).all()
    for words in ("max_position_embeddings=1024", "1025 positions", "Shorten the prompt"):
        assert words in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# 5. data: malformed JSON Lines named by file and line, empty files, wrong columns, missing images, image root


def _jsonl(folder: Path, lines: list[str], name: str = "train.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _record(index: int, image: str | None = None) -> str:
    return json.dumps({"id": f"r{index}", "image": image or f"images/{index}.png", "question": "Which digit?",
                       "rationale": "The square holds one.", "answer": "1"})  # fmt: skip


def _data_folder(ctx: Context) -> Path:
    folder = ctx.tmp_path / "data"
    shutil.copytree(ctx.data / "images", folder / "images")
    return folder


def _malformed_line(ctx):
    folder = _data_folder(ctx)
    load_records(str(_jsonl(folder, [_record(0), _record(1), '{"id": "r2", "question": "unterminated', _record(3)])))


def _line_not_an_object(ctx):
    folder = _data_folder(ctx)
    load_records(str(_jsonl(folder, [_record(0), "[1, 2]"])))


def _all_lines_malformed(ctx):
    folder = _data_folder(ctx)
    load_records(str(_jsonl(folder, ["{", "nope"])), on_error="skip")


def _empty_jsonl(ctx):
    folder = _data_folder(ctx)
    (folder / "train.jsonl").write_text("")
    load_records(str(folder / "train.jsonl"))


def _blank_jsonl(ctx):
    folder = _data_folder(ctx)
    load_records(str(_jsonl(folder, ["", "  "])))


def _empty_json_list(ctx):
    folder = _data_folder(ctx)
    (folder / "train.json").write_text("[]")
    load_records(str(folder / "train.json"))


def _wrong_parquet_columns(ctx):
    import datasets

    folder = _data_folder(ctx)
    datasets.Dataset.from_list([{"img": "images/0.png", "prompt": "q", "label": "1"}]).to_parquet(
        folder / "train.parquet"
    )
    load_records(str(folder / "train.parquet"))


def _missing_image(ctx):
    folder = _data_folder(ctx)
    load_records(str(_jsonl(folder, [_record(0), _record(1, image="images/missing.png")])))


def _relative_path_escapes_root(ctx):
    folder = _data_folder(ctx)
    make_image(5).save(ctx.tmp_path / "outside.png")
    load_records(str(_jsonl(folder, [_record(0), _record(1, image="../outside.png")])))


def _absolute_path_outside_root(ctx):
    folder = _data_folder(ctx)
    make_image(5).save(ctx.tmp_path / "outside.png")
    load_records(str(_jsonl(folder, [_record(0, image=str(ctx.tmp_path / "outside.png"))])))


def _symlink_escapes_root(ctx):
    folder = _data_folder(ctx)
    make_image(5).save(ctx.tmp_path / "outside.png")
    (folder / "images" / "link.png").symlink_to(ctx.tmp_path / "outside.png")
    load_records(str(_jsonl(folder, [_record(0, image="images/link.png")])))


def _escape_with_image_folder(ctx):
    folder = _data_folder(ctx)
    make_image(5).save(folder / "beside.png")  # inside the data folder, outside the given image_folder
    load_records(str(_jsonl(folder, [_record(0, image="../beside.png")])), image_folder=str(folder / "images"))


def _bad_on_error(ctx):
    load_records(str(ctx.data / "train.jsonl"), on_error="ignore")


DATA_CASES = [
    ("malformed-jsonl-line", _malformed_line, MalformedLineError,
     ("train.jsonl:3", "line 3 is not a JSON record", "on_error='skip'")),
    ("jsonl-line-not-an-object", _line_not_an_object, MalformedLineError, ("train.jsonl:2", "list, not an object")),
    ("all-lines-malformed", _all_lines_malformed, ValueError, ("all 2 lines are malformed", "nothing to train on")),
    ("empty-jsonl-file", _empty_jsonl, ValueError, ("train.jsonl is empty",)),
    ("blank-jsonl-file", _blank_jsonl, ValueError, ("train.jsonl is empty", "holds no records")),
    ("empty-json-list", _empty_json_list, ValueError, ("train.json", "no records")),
    ("wrong-parquet-columns", _wrong_parquet_columns, ValueError,
     ("Cannot detect the record format", "'img'", "kind='reasoning'")),
    ("missing-image", _missing_image, MalformedRecordError, ("record 1", "missing.png", "does not exist")),
    ("relative-path-escapes-root", _relative_path_escapes_root, MalformedRecordError,
     ("record 1", "outside the image folder", "--allow_images_outside_root")),
    ("absolute-path-outside-root", _absolute_path_outside_root, MalformedRecordError,
     ("record 0", "outside.png", "outside the image folder")),
    ("symlink-escapes-root", _symlink_escapes_root, MalformedRecordError, ("record 0", "outside the image folder")),
    ("image-folder-is-the-root", _escape_with_image_folder, MalformedRecordError,
     ("record 0", "outside the image folder")),
    ("unknown-on-error", _bad_on_error, ValueError, ("on_error must be 'raise' or 'skip'", "'ignore'")),
]  # fmt: skip


@pytest.mark.parametrize("case,error,words", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_data_errors(case, error, words, ctx):
    run_case(case, ctx, error, words)


def test_on_error_skip_skips_and_counts_a_malformed_line(ctx):
    folder = _data_folder(ctx)
    path = _jsonl(folder, [_record(0), "{not json", _record(2), _record(3, image="images/missing.png")])
    records = load_records(str(path), on_error="skip")
    assert [example["id"] for example in records] == ["r0", "r2"]
    assert records.num_skipped == 2 and records.skipped[0][0] == "line 2" and records.skipped[1][0] == 2
    record = run_stage(*stage_args(ctx, ctx.tmp_path / "out", "--on_error", "skip", "--max_steps", "1",
                                   "--train_file", str(path)))  # fmt: skip
    assert record["skipped_records"] == 2


def test_images_outside_the_root_load_when_allowed(ctx):
    folder = _data_folder(ctx)
    make_image(5).save(ctx.tmp_path / "outside.png")
    path = _jsonl(folder, [_record(0), _record(1, image="../outside.png")])
    records = load_records(str(path), allow_images_outside_root=True)
    assert records[1]["image"].size == (64, 64)
    args = stage_args(ctx, ctx.tmp_path / "out", "--train_file", str(path), "--allow_images_outside_root", "True")
    assert args[1].allow_images_outside_root is True


def _cli_malformed_jsonl(ctx):
    folder = _data_folder(ctx)
    path = _jsonl(folder, [_record(0), "{oops", _record(1)])
    argv = _train_argv(ctx, ctx.tmp_path / "out")
    argv[argv.index("--train_file") + 1] = str(path)
    return argv


def _cli_image_outside_root(ctx):
    folder = _data_folder(ctx)
    make_image(5).save(ctx.tmp_path / "outside.png")
    argv = _train_argv(ctx, ctx.tmp_path / "out")
    argv[argv.index("--train_file") + 1] = str(_jsonl(folder, [_record(0, image="../outside.png")]))
    return argv


CLI_DATA_CASES = [
    ("malformed-jsonl", _cli_malformed_jsonl, ("train.jsonl:2", "--on_error skip")),
    ("image-outside-root", _cli_image_outside_root, ("record 0", "outside the image folder")),
]


@pytest.mark.parametrize("case,words", [c[1:] for c in CLI_DATA_CASES], ids=[c[0] for c in CLI_DATA_CASES])
def test_cli_data_errors_are_one_line(case, words, ctx, capsys):
    argv = case(ctx)
    capsys.readouterr()
    assert main(argv) == 2
    output = capsys.readouterr().err
    # datasets may draw a progress bar ("Generating train split") before the check; the error is one line, the last
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in output, output
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"


# Issue 27, item 4: a text token inside the latent region is named, not reported as a slot-count mismatch.
def test_text_token_inside_the_latent_region_is_named(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = processor.apply_chat_template(
        chat(make_image(0), "Which digit?"), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    input_ids = inputs["input_ids"].clone()
    column = int((input_ids[0] == model.config.latent_token_id).nonzero()[3])
    foreign = processor.tokenizer.convert_tokens_to_ids("a")
    input_ids[0, column] = foreign
    with pytest.raises(ValueError) as caught:
        model.generate(input_ids=input_ids, attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"], max_new_tokens=1)  # fmt: skip
    message = str(caught.value)
    assert f"column {column}" in message and str(foreign) in message, message


def test_text_only_prompt_with_adaptive_halting_is_answered_as_with_k0(tiny_model_and_processor):
    """Issue 27, item 4 (found by fuzzing): a chat without an image has no latent region, so adaptive halting has
    nothing to stop; it is answered as with K=0 instead of failing on the halting mask."""
    model, processor = tiny_model_and_processor
    inputs = processor.apply_chat_template(
        chat(None, "Which digit?"), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    halted = model.generate(**inputs, max_new_tokens=3, do_sample=False, latent_halting="cosine",
                            latent_halting_threshold=0.9)  # fmt: skip
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_latent_steps=0)
    assert torch.equal(halted, plain)


@pytest.mark.parametrize("value", [0.5, 2.0, True])
def test_generate_refuses_a_max_new_tokens_that_is_not_an_integer(tiny_model_and_processor, value):
    """Found by the long fuzz run (issue 27, item 5): GenerationMixin only checks the sign, so max_new_tokens=0.5
    generated one token; a non-integer length is refused, naming the argument."""
    model, processor = tiny_model_and_processor
    inputs = processor.apply_chat_template(
        chat(make_image(0), "Which digit?"), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        model.generate(**inputs, max_new_tokens=value)
