"""`lare train --fsdp` and `--deepspeed` build the TrainingArguments / accelerate plugins of sharded training
(issue 24, item 4). No GPU needed: the arguments and plugins are built, nothing is launched (accelerate falls back
to DDP on CPU, so a real FSDP / DeepSpeed run needs GPUs)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lare_hf.training.arguments import parse_train_arguments
from lare_hf.training.fsdp import fsdp_layer_class_names, fsdp_units


def arguments(tiny_checkpoint, tmp_path, *flags):
    base = ["--model_name_or_path", tiny_checkpoint, "--train_file", "unused.jsonl", "--output_dir", str(tmp_path)]
    return parse_train_arguments("tiny/stage2", base + list(flags))


def test_fsdp_flag_gives_fsdp2_with_the_apply_fsdp2_wrap_policy(tiny_checkpoint, tiny_model_and_processor, tmp_path):
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, _, training_args = arguments(tiny_checkpoint, tmp_path, "--fsdp")
    expected = sorted({type(module).__name__ for _, module in fsdp_units(tiny_model_and_processor[0])})
    assert expected == ["CLIPEncoderLayer", "LaReExtractor", "LaReImageReconstructor", "Qwen2DecoderLayer"]
    assert fsdp_layer_class_names(tiny_checkpoint) == expected  # read from the config alone (meta device)
    plugin = FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == expected
    assert plugin.reshard_after_forward is True
    assert training_args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    assert training_args.per_device_train_batch_size == 4  # the recipe's values are kept


def test_fsdp_config_of_the_user_wins(tiny_checkpoint, tmp_path):
    config = tmp_path / "fsdp.json"
    config.write_text(
        json.dumps({"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"], "reshard_after_forward": False})
    )
    _, _, training_args = arguments(tiny_checkpoint, tmp_path, "--fsdp", "--fsdp_config", str(config))
    assert training_args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "Qwen2DecoderLayer"
    assert training_args.fsdp_plugin_args["reshard_after_forward"] is False


def test_no_fsdp_flag_leaves_the_arguments_unsharded(tiny_checkpoint, tmp_path):
    _, _, training_args = arguments(tiny_checkpoint, tmp_path)
    assert not training_args.fsdp and training_args.fsdp_plugin_args is None and training_args.deepspeed is None


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed here")
def test_deepspeed_without_deepspeed_names_the_fix(tiny_checkpoint, tmp_path):
    with pytest.raises(ImportError, match="pip install deepspeed"):
        arguments(tiny_checkpoint, tmp_path, "--deepspeed", "zero3")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_flag_gives_the_packaged_zero_config(tiny_checkpoint, tmp_path, stage):
    pytest.importorskip("deepspeed")
    _, _, training_args = arguments(tiny_checkpoint, tmp_path, "--deepspeed", f"zero{stage}")
    assert training_args.deepspeed.endswith(f"configs/deepspeed/zero{stage}.json")
    config = training_args.hf_deepspeed_config.config
    assert config["zero_optimization"]["stage"] == stage == training_args.deepspeed_plugin.zero_stage
    assert config["train_micro_batch_size_per_gpu"] == training_args.per_device_train_batch_size  # "auto" filled
