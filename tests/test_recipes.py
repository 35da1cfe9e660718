"""The packaged stage recipes against Appendix B of the paper."""

from __future__ import annotations

import pytest
import yaml

from lare_hf.configs import packaged_configs_dir

# what a stage changes by design: its stage, its input / output and data, and the run's length and logging
PER_STAGE = {"stage", "model_name_or_path", "train_file", "image_folder", "output_dir", "data_kind", "save_steps"}


def load(folder: str, stage: int) -> dict:
    return yaml.safe_load((packaged_configs_dir() / folder / f"stage{stage}.yaml").read_text())


@pytest.mark.parametrize("folder", [".", "tiny"])
@pytest.mark.parametrize("stage", [3, 4])
def test_stages_three_and_four_take_stage_two_settings(folder, stage):
    """Appendix B: in stages III and IV "all parameters except for the visual encoder are updated, while other
    hyperparameter settings remain identical to those in Stage II" (one learning rate, stage II's)."""
    stage2, recipe = load(folder, 2), load(folder, stage)
    shared = {key: value for key, value in stage2.items() if key not in PER_STAGE}
    assert {key: recipe.get(key) for key in shared} == shared
    extra = set(recipe) - set(stage2) - PER_STAGE
    assert not extra, f"stage {stage} sets {sorted(extra)}, which stage II does not"


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_warmup_is_said_to_be_llava_s_value(stage):
    text = (packaged_configs_dir() / f"stage{stage}.yaml").read_text()
    assert "warmup_steps: 0.03" in text and "as in the paper" not in text
    assert "Warmup ratio 0.03 is LLaVA-1.5's" in text


@pytest.mark.parametrize("stage", [2, 3, 4])
def test_stage_recipes_keep_long_rationales_whole(stage, tmp_path):
    """L_Z<->T (Eq. 6) takes T from the rationale; the recipes keep a few hundred tokens of it (the cut, 512 by
    default, is ours: benchmarks/bench_rationale_length.py)."""
    from lare_hf.build import build_tiny
    from lare_hf.training.arguments import parse_train_arguments

    _, data_args, _ = parse_train_arguments(str(packaged_configs_dir() / f"stage{stage}.yaml"))
    assert data_args.max_rationale_length == 512
    _, processor = build_tiny(seed=0)
    rationale = " ".join(f"step {i}: the red cell names blue." for i in range(30))
    length = len(processor.tokenizer.encode(rationale, add_special_tokens=False))
    assert 300 < length <= 512
    messages = [{"role": "user", "content": [{"type": "text", "text": "which cell?"}]}]
    batch = processor.build_training_inputs(
        [messages], ["blue"], rationales=[rationale], num_latent_steps=0,
        max_rationale_length=data_args.max_rationale_length,
    )  # fmt: skip
    assert int(batch["rationale_attention_mask"].sum()) == length
