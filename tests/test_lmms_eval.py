"""lmms-eval for real: `python -m lmms_eval --model lare --model_args pretrained=DIR` on a local task.

The task is in lmms-eval's own format: a YAML file (with its `utils.py`) over a local parquet file of RefocusShapes
questions. Runs where lmms-eval is installed (`pip install -e ".[lmms]" -c constraints/lmms.txt`; CI does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lmms_eval", reason='lmms-eval is not installed: pip install -e ".[lmms]" -c constraints/lmms.txt')

from lare_hf.data.refocus_shapes import generate_refocus_shapes  # noqa: E402

TASK_UTILS = '''
"""RefocusShapes as an lmms-eval task: prompts and answer matching from lare_hf's benchmark definition."""

from lare_hf.evaluation.benchmarks import RefocusShapesBenchmark

BENCHMARK = RefocusShapesBenchmark()
COLUMNS = {key: names[0] for key, names in BENCHMARK.columns.items()}


def _sample(doc):
    return BENCHMARK._make_sample(doc, COLUMNS, 0, "lmms-eval")


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _sample(doc).prompt


def process_results(doc, results):
    return {"accuracy": 100.0 * BENCHMARK.is_correct(results[0], _sample(doc))}
'''

TASK_YAML = """
task: refocus_shapes_local
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


@pytest.mark.slow
def test_lmms_eval_runs_the_lare_model_on_a_local_task(tmp_path, tiny_checkpoint):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    parquet = tmp_path / "refocus_shapes_test.parquet"
    generate_refocus_shapes(num_train=0, num_test=6, seed=3)["test"].to_parquet(str(parquet))
    (task_dir / "utils.py").write_text(textwrap.dedent(TASK_UTILS))
    (task_dir / "refocus_shapes_local.yaml").write_text(TASK_YAML.format(parquet=parquet))
    output = tmp_path / "logs"
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "lare",
        "--model_args", f"pretrained={tiny_checkpoint},num_latent_steps=2",
        "--tasks", "refocus_shapes_local", "--include_path", str(task_dir),
        "--batch_size", "4", "--device", "cpu", "--output_path", str(output), "--log_samples",
    ]  # fmt: skip
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    score_files = sorted(output.rglob("*results.json"))
    assert score_files, f"no results file under {output}: {sorted(p.name for p in output.rglob('*'))}"
    results = json.loads(score_files[-1].read_text())
    task = results["results"]["refocus_shapes_local"]
    accuracy = task["accuracy,none"]
    assert 0.0 <= accuracy <= 100.0
    assert results["config"]["model"] == "lare"
    assert "num_latent_steps=2" in results["config"]["model_args"]
    assert results["config"]["batch_size"] in (4, "4")
    samples = sorted(output.rglob("*samples_refocus_shapes_local*.jsonl"))
    assert samples, "--log_samples wrote no per-sample file"
    logged = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    assert len(logged) == 6
    # the score file's accuracy is the mean of the per-sample judgements lmms-eval logged
    assert accuracy == pytest.approx(sum(row["accuracy"] for row in logged) / len(logged))
    # and the logged answers are LaRe's own, with K = 2 from --model_args
    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    docs = datasets.load_dataset("parquet", data_files={"test": str(parquet)})["test"]
    for row in logged:
        doc = docs[row["doc_id"]]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["input"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, num_latent_steps=2)
        inputs = processor(text=[prompt], images=[doc["image"].convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        response = row["filtered_resps"]
        assert (response[0] if isinstance(response, list) else response) == answer.strip()
