"""`lare demo` end to end, and the small CLI commands around training (push dry run, merge errors)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from lare_hf.cli import main


@pytest.mark.slow
def test_lare_demo_runs_the_whole_pipeline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lare_hf.cli", "demo", "--output", str(tmp_path), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "demo.json").read_text())
    for name in ("k0", summary["variant"]):
        assert (tmp_path / name / "model.safetensors").is_file() and (
            tmp_path / name / "processor_config.json"
        ).is_file()
    assert (tmp_path / "refocus.png").stat().st_size > 10_000
    assert {"train.jsonl", "test.jsonl", "captions.jsonl"} <= {p.name for p in (tmp_path / "data").iterdir()}
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"demo: LaRe \((\w+)\) (\d+\.\d)% vs K=0 (\d+\.\d)% on (\d+) held-out questions "
        r"\(window hit rate (\d+\.\d)%\)",
        last,
    )
    assert match, last
    assert match.group(1) == summary["variant"] == "lare_grounded_k2"
    assert float(match.group(2)) == round(summary["lare_accuracy"], 1) and int(match.group(4)) == summary["num_test"]
    assert "chat:" in result.stdout and summary["chat"]["question"].startswith("From the ")
    assert summary["variant"] == "lare_grounded_k2" and summary["window_loss_weight"] == 1.0
    card = (tmp_path / "lare_grounded_k2" / "README.md").read_text()
    assert "Not in the paper: window-grounding loss (window_loss_weight=1.0)" in card
    assert "Not in the paper" not in (tmp_path / "k0" / "README.md").read_text()


def test_model_card_names_the_window_grounding_loss(tmp_path):
    from lare_hf.build import build_tiny, save_checkpoint
    from lare_hf.hub import build_model_card

    for weight in (0.0, 1.0):
        model, processor = build_tiny(overrides={"window_loss_weight": weight})
        card = str(build_model_card(save_checkpoint(model, processor, str(tmp_path / str(weight)))))
        assert ("Not in the paper: window-grounding loss (window_loss_weight=1.0)" in card) == bool(weight)


def test_demo_help_names_the_model_and_what_the_default_variant_adds(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tiny preset" not in text and "the reproduction's small LaRe for RefocusChains" in text
    assert "lare_grounded_k2, is answer-only with the window-grounding loss, which is not in the paper" in text
    assert "16 training boards, 8 held-out questions" in text and "2 training steps per stage" in text


def test_demo_refuses_a_variant_without_latent_steps_before_writing(tmp_path, capsys):
    target = tmp_path / "demo"
    assert main(["demo", "--output", str(target), "--variant", "k0"]) == 2
    error = capsys.readouterr().err
    assert "--variant must be a LaRe variant (K >= 1), got 'k0'" in error and "lare_grounded_k2" in error
    assert main(["demo", "--output", str(target), "--variant", "lare_q"]) == 2
    assert "Unknown variant 'lare_q'" in capsys.readouterr().err
    assert not target.exists()


def test_push_dry_run_writes_the_card_and_lists_files(tiny_checkpoint, capsys):
    assert main(["push", tiny_checkpoint, "--repo-id", "org/lare-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "modeling_lare.py" in out and "README.md" in out
    card = (__import__("pathlib").Path(tiny_checkpoint) / "README.md").read_text()
    assert "# org/lare-tiny" in card and "built, not trained" in card


def test_train_without_recipe_or_with_bad_recipe_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--stage", "2"]) == 2
    assert "needs --config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 2\nnot_an_argument: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "Unknown key in recipe" in capsys.readouterr().err
