"""`lare eval` end to end on the tiny checkpoint and a tiny file of each benchmark format."""

from __future__ import annotations

import json

import datasets
import pytest

from benchmark_files import image_dataset, png, write_mmbench, write_pope
from lare_hf.cli import main
from lare_hf.data.refocus_shapes import write_refocus_shapes
from lare_hf.evaluation.runner import count_new_tokens


def write_mmstar(path):
    image_dataset(
        {"index": [0, 1], "question": ["What is shown?\nOptions: A: a cat, B: a dog"] * 2, "answer": ["A", "B"],
         "category": ["coarse perception"] * 2, "l2_category": ["scene"] * 2, "meta_info": [{"source": "x"}] * 2},
        [png((0, 0, 255))] * 2,
    ).to_parquet(str(path))  # fmt: skip


def write_mmvp(path):
    image_dataset(
        {"Index": [1, 2], "Question": ["Open or closed?"] * 2, "Options": ["(a) Open (b) Closed"] * 2,
         "Correct Answer": ["(a)", "(b)"]},
        [png((1, 2, 3)), png((4, 5, 6))],
    ).to_parquet(str(path))  # fmt: skip


def write_scienceqa(path):
    datasets.Dataset.from_dict(
        {"image": [png((9, 9, 9)), png((7, 7, 7))], "question": ["Which is a mammal?"] * 2,
         "choices": [["frog", "whale"]] * 2, "answer": [1, 1], "hint": ["", ""], "subject": ["natural science"] * 2,
         "category": ["Classification"] * 2, "grade": ["grade2"] * 2}
    ).cast_column("image", datasets.Image()).to_parquet(str(path))  # fmt: skip


WRITERS = {"mmbench": write_mmbench, "mmstar": write_mmstar, "mmvp": write_mmvp, "scienceqa": write_scienceqa,
           "pope": write_pope}  # fmt: skip


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_lare_eval_on_each_public_format(name, tiny_checkpoint, tmp_path, capsys):
    benchmark = name  # (a parameter called `benchmark` would shadow pytest-benchmark's fixture)
    data = tmp_path / f"{benchmark}.parquet"
    WRITERS[benchmark](data)
    code = main(["eval", "--model", tiny_checkpoint, "--benchmark", benchmark, "--data", str(data),
                 "--batch-size", "4", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "out" / f"eval_{benchmark}.json").read_text())
    assert printed == report
    assert report["benchmark"] == benchmark and report["num_latent_steps"] == 4
    assert 0 <= report["accuracy"] <= 100 and report["latency_s_per_sample"] > 0
    assert 1 <= report["avg_tokens"] <= 4
    predictions = (tmp_path / "out" / f"predictions_{benchmark}.jsonl").read_text().splitlines()
    assert len(predictions) == report["num_samples"]
    row = json.loads(predictions[0])
    assert {"id", "prediction", "extracted", "answer", "correct", "num_tokens", "prompt"} <= set(row)


def test_lare_eval_refocus_shapes_with_and_without_latents(tiny_checkpoint, tmp_path, capsys):
    paths = write_refocus_shapes(str(tmp_path / "rs"), 8, 8, seed=1)
    reports = {}
    for steps in ("4", "0"):
        assert main(["eval", "--model", tiny_checkpoint, "--benchmark", "refocus_shapes", "--data", paths["test"],
                     "--num-latent-steps", steps, "--max-new-tokens", "3", "--output-dir",
                     str(tmp_path / steps)]) == 0  # fmt: skip
        reports[steps] = json.loads(capsys.readouterr().out)
    assert reports["4"]["num_latent_steps"] == 4 and reports["0"]["num_latent_steps"] == 0
    assert set(reports["4"]["per_category"]) == {"single", "compare", "spatial", "exists", "multiple_choice",
                                                 "minimal_pair"}  # fmt: skip


def test_bad_benchmark_name_and_missing_file(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", "--model", tiny_checkpoint, "--benchmark", "mmbenchh", "--data", str(tmp_path)]) == 2
    assert "Unknown benchmark 'mmbenchh'" in capsys.readouterr().err


def test_token_counting_stops_at_eos_and_padding():
    import torch

    tokens = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert count_new_tokens(tokens, {2}, 0) == [3, 5, 1]


def test_lare_eval_next_to_the_checkpoint_adds_the_row_to_its_card(tiny_checkpoint, tmp_path, capsys):
    import shutil

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    assert "No evaluation report" in (checkpoint / "README.md").read_text()  # save_pretrained wrote the card
    paths = write_refocus_shapes(str(tmp_path / "rs"), 0, 4, seed=2)
    assert main(["eval", "--model", str(checkpoint), "--benchmark", "refocus_shapes", "--data", paths["test"],
                 "--max-new-tokens", "2"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert f"| refocus_shapes | 4 | {report['accuracy']:.2f} |" in (checkpoint / "README.md").read_text()
