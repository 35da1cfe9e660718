"""Bad input gets a clear error, and nothing a user wrote is overwritten (issue 11).

Each case gives bad input to one boundary (config, processor / chat template, model forward / generate, checkpoints,
data, command line) and asserts the exception type and the words of the message that tell the user what to fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import make_image
from lare_hf.build import build_tiny
from lare_hf.cli import main
from lare_hf.destinations import last_complete_checkpoint
from lare_hf.modeling.configuration_lare import LaReConfig
from lare_hf.training.arguments import parse_train_arguments
from lare_hf.training.run import run_stage

REPO = Path(__file__).resolve().parents[1]


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
    return parse_train_arguments(str(REPO / "configs" / "tiny" / f"stage{stage}.yaml"), overrides)


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


def run_case(case, ctx: Context, error: type[BaseException], words: tuple[str, ...]) -> None:
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
    return ["train", "--config", str(REPO / "configs" / "tiny" / "stage2.yaml"), "--model", ctx.checkpoint,
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
    assert (output / ".partial-checkpoint-2" / "checkpoint-2" / "model.safetensors").is_file()
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
