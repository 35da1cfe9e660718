"""RefocusChains (generator, held-out rules, scoring), per-step latent labels, and the reproduction's pieces."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lare_hf.data.refocus_chains import (
    CELL_SIZE,
    COLOUR_NAMES,
    COLOURS,
    GRID,
    board_split,
    chain_rationale_after,
    chain_step_targets,
    chain_window_targets,
    follow,
    generate_captions,
    generate_split,
    render_board,
    sample_board,
    verify_held_out,
    window_hits,
    write_refocus_chains,
)

REPO = Path(__file__).resolve().parents[1]


def _board(record):
    board = json.loads(record["board"])
    return board["cells"], dict(zip(board["cells"], board["marks"]))


def test_records_follow_the_marks_and_name_the_visited_cells():
    records = generate_split("train", 40, seed=3, hops=(1, 2, 3, 4))
    assert [r["hops"] for r in records[:8]] == [1, 2, 3, 4, 1, 2, 3, 4]
    for record in records:
        cells, marks = _board(record)
        h = record["hops"]
        start = record["question"].split("From the ")[1].split(" cell")[0]
        path = follow(marks, start, h)
        assert record["question"] == f"From the {start} cell, follow {h} mark{'s' if h > 1 else ''}."
        assert record["answer"] == f"the {path[-1]} cell"
        assert record["rationale"] == "path: " + " ".join(path)
        assert chain_step_targets(record) == path[1:]
        assert record["category"] == str(h)
        assert record["visited_cells"] == [list(divmod(cells.index(c), GRID)) for c in path[:-1]]
        # the marks are one 9-cycle: no cell marks itself, following 9 marks returns to the start, not earlier
        assert all(marks[c] != c for c in cells)
        assert [follow(marks, start, n)[-1] == start for n in range(1, 10)] == [False] * 8 + [True]


def test_image_shows_each_cell_colour_and_its_mark():
    records = generate_split("test", 5, seed=0, layout="random")
    for record in records:
        cells, marks = _board(record)
        pixels = np.asarray(record["image"])
        assert pixels.shape == (GRID * CELL_SIZE, GRID * CELL_SIZE, 3)
        for index, colour in enumerate(cells):
            row, col = divmod(index, GRID)
            y, x = row * CELL_SIZE, col * CELL_SIZE
            assert tuple(pixels[y, x]) == COLOURS[colour]  # the cell's corner: its name colour
            centre = pixels[y + CELL_SIZE // 2, x + CELL_SIZE // 2]
            assert tuple(centre) == COLOURS[marks[colour]]  # its centre: the mark
    assert sorted(_board(records[0])[0]) == sorted(COLOUR_NAMES)


def test_generation_is_deterministic_and_splits_are_held_out(tmp_path):
    a = generate_split("train", 12, seed=5)
    b = generate_split("train", 12, seed=5)
    assert [r["board"] for r in a] == [r["board"] for r in b]
    assert [r["board"] for r in a] != [r["board"] for r in generate_split("train", 12, seed=6)]
    paths = write_refocus_chains(tmp_path, 30, 20, seed=1, num_captions=40)
    assert set(paths) == {"train", "test", "captions"}
    rows = {name: [json.loads(line) for line in open(path)] for name, path in paths.items()}
    summary = verify_held_out(rows)
    assert summary["test_boards"] == 20 and summary["train_boards"] == 30
    assert all((tmp_path / row["image"]).is_file() for row in rows["train"])
    for row in rows["test"]:
        assert board_split(*_board(row)) == "test"
    # a test board slipped into training is caught
    with pytest.raises(ValueError, match="train record test-000000 has a test board"):
        verify_held_out({"train": rows["test"][:1], "test": rows["test"]})


def test_captions_read_uniform_boards_and_list_every_cell_once():
    records = generate_captions(40, seed=2, uniform_fraction=0.5)
    kinds = {"uniform": 0, "board": 0}
    for record in records:
        cells, marks = _board(record)
        pixels = np.asarray(record["image"])
        if len(set(cells)) == 1:
            kinds["uniform"] += 1
            assert (
                record["answer"]
                == f"cells: {cells[0]}, marks: {marks[cells[0]]}"
                != f"cells: {cells[0]}, marks: {cells[0]}"
            )
            assert tuple(pixels[0, 0]) == COLOURS[cells[0]] and tuple(pixels[12, 12]) == COLOURS[marks[cells[0]]]
            continue
        kinds["board"] += 1
        assert board_split(cells, marks) == "train"
        pairs = record["answer"].removeprefix("cells: ").split(", ")
        assert sorted(pairs) == sorted(f"{c} {marks[c]}" for c in cells)
    assert kinds["uniform"] > 5 and kinds["board"] > 5
    assert all(len(set(_board(r)[0])) == 9 for r in generate_captions(5, uniform_fraction=0.0))


def test_lookup_captions_ask_one_cell_and_answer_its_mark():
    records = generate_captions(60, seed=3, uniform_fraction=0.2, lookup_fraction=0.5)
    lookups = [r for r in records if r["question"].startswith("What is the mark of the ")]
    assert 15 < len(lookups) < 45
    for record in lookups:
        cells, marks = _board(record)
        colour = record["question"].removeprefix("What is the mark of the ").removesuffix(" cell?")
        assert colour in cells and record["answer"] == marks[colour] != colour
        assert board_split(cells, marks) == "train"
        row, col = divmod(cells.index(colour), 3)
        assert tuple(np.asarray(record["image"])[row * 8 + 4, col * 8 + 4]) == COLOURS[marks[colour]]
    with pytest.raises(ValueError, match="uniform_fraction \\+ lookup_fraction must be <= 1"):
        generate_captions(4, uniform_fraction=0.6, lookup_fraction=0.6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: generate_split("val", 1), "split must be 'train' or 'test', got 'val'"),
        (lambda: generate_split("train", 1, layout="spiral"), "layout must be one of .*'spiral'"),
        (lambda: generate_split("train", 1, hops=(0, 2)), r"hops must be .* in 1..8, got \[0, 2\]"),
        (lambda: generate_split("train", 1, hops=()), "hops must be a non-empty list"),
        (lambda: generate_split("train", -1), "num must be >= 0, got -1"),
        (lambda: render_board(list(COLOUR_NAMES), {c: c for c in COLOUR_NAMES}, 3), "cell_size must be an even"),
        (lambda: chain_step_targets({"id": "x", "rationale": "I think"}), "no RefocusChains rationale"),
    ],
)
def test_bad_settings_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sample_board_respects_the_split():
    rng = np.random.default_rng(0)
    assert all(board_split(*sample_board(rng, "test")) == "test" for _ in range(10))
    assert all(board_split(*sample_board(rng, "train", "random")) == "train" for _ in range(10))


def test_window_hits():
    visited = [[0, 0], [1, 2], [2, 1]]
    assert window_hits([[0, 0], [1, 2], [0, 0]], visited, 1) == [True, True, False]
    assert window_hits([[0, 0], [0, 1]], visited, 2) == [True, True, False]  # no third window: a miss
    assert window_hits([[0, 0], [0, 0], [0, 0]], visited, 3) == [True, True, True]


def test_benchmark_reads_the_files_and_judges_the_final_colour(tmp_path):
    from lare_hf.evaluation.benchmarks import get_benchmark

    paths = write_refocus_chains(tmp_path, 2, 6, seed=0, hops=(2,))
    bench = get_benchmark("refocus_chains")
    samples = bench.load(paths["test"])
    assert len(samples) == 6 and samples[0].image is not None
    sample = samples[0]
    assert sample.answer in COLOUR_NAMES and sample.category == "2" and len(sample.meta["visited_cells"]) == 2
    other = next(c for c in COLOUR_NAMES if c != sample.answer)
    reasoning = f"path: {other} {other} {sample.answer}\nAnswer: the {sample.answer} cell"
    predictions = [reasoning, f"the {sample.answer} cell", f"Answer: the {other} cell", "", f"the {other} or blue"]
    assert [bench.extract(p, sample) for p in predictions] == [sample.answer, sample.answer, other, "", ""]
    report = bench.score(samples, [reasoning] + ["Answer: nothing"] * 5)
    assert math.isclose(report["accuracy"], 100 / 6) and report["per_category"] == {"2": report["accuracy"]}


def test_collator_labels_each_latent_step_with_its_hop(tmp_path):
    from lare_hf.data.collator import LaReDataCollator
    from lare_hf.data.formats import load_records
    from lare_hf.reproduction import build_chains_model

    _, processor = build_chains_model()
    paths = write_refocus_chains(tmp_path, 4, 1, seed=0, hops=(1, 3))
    records = load_records(paths["train"])
    features = [records[0], records[1]]
    batch = LaReDataCollator(
        processor=processor, num_latent_steps=2, response_format="answer", latent_step_targets=chain_step_targets
    )(features)
    plain = LaReDataCollator(processor=processor, num_latent_steps=2, response_format="answer")(features)
    tokenizer = processor.tokenizer
    for row, feature in enumerate(features):
        start = batch["input_ids"][row].tolist().index(processor.latent_start_token_id)
        expected = chain_step_targets(feature)[:2]
        got = [tokenizer.decode([int(batch["labels"][row, start + k])]) for k in range(1, 1 + len(expected))]
        assert got == [f" {c}" for c in expected]
        extra = (batch["labels"][row] != plain["labels"][row]).nonzero().flatten().tolist()
        assert extra == [start + k for k in range(1, 1 + len(expected))]  # nothing else changed
    with pytest.raises(ValueError, match="num_latent_steps is 0"):
        LaReDataCollator(processor=processor, num_latent_steps=0, latent_step_targets=chain_step_targets)(features)


def test_collator_adds_the_cell_each_hop_reads_as_window_targets(tmp_path):
    from lare_hf.data.collator import LaReDataCollator
    from lare_hf.data.formats import load_records
    from lare_hf.reproduction import build_chains_model

    _, processor = build_chains_model()
    paths = write_refocus_chains(tmp_path, 6, 1, seed=0, hops=(1, 3))
    raw = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
    records = [load_records(paths["train"])[index] for index in range(4)]
    batch = LaReDataCollator(
        processor=processor, num_latent_steps=2, response_format="answer", window_targets=chain_window_targets
    )(records)
    for row, record in enumerate(raw[:4]):
        cells = [r * GRID + c for r, c in record["visited_cells"]]  # the generator's own account of the chain
        assert chain_window_targets(records[row]) == cells
        assert batch["window_targets"][row].tolist() == (cells + [-100, -100])[:2]
    with pytest.raises(ValueError, match="num_latent_steps is 0"):
        LaReDataCollator(processor=processor, num_latent_steps=0, window_targets=chain_window_targets)(records)


def test_window_grounding_loss_moves_the_saliency_onto_the_needed_cell(tmp_path):
    """The loss is -log of step k's saliency share at the needed cell; optimising it raises that share (the argmax
    window alone passes no gradient). Off (None) at weight 0; bad targets are named."""
    import torch

    from lare_hf.data.collator import LaReDataCollator
    from lare_hf.data.formats import load_records
    from lare_hf.reproduction import build_chains_model

    torch.manual_seed(0)
    model, processor = build_chains_model({"window_loss_weight": 1.0})
    paths = write_refocus_chains(tmp_path, 8, 1, seed=0, hops=(2, 3))
    collate = LaReDataCollator(
        processor=processor, num_latent_steps=3, response_format="answer", window_targets=chain_window_targets
    )
    records = load_records(paths["train"])
    batch = collate([records[index] for index in range(len(records))])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(**batch)
        losses.append(float(out.window_loss.detach()))
        optimizer.zero_grad()
        out.window_loss.backward()
        optimizer.step()
    assert out.saliency_maps.requires_grad and losses[-1] < 0.5 * losses[0], losses
    expected = out.lm_loss + out.alignment_loss + 0.9 * out.image_reconstruction_loss
    expected = expected + 0.9 * out.text_reconstruction_loss + out.window_loss
    torch.testing.assert_close(out.loss, expected)
    model.config.window_loss_weight = 0.0
    assert model(**batch).window_loss is None
    model.config.window_loss_weight = 1.0
    bad = dict(batch, window_targets=batch["window_targets"].clone().fill_(9))
    with pytest.raises(ValueError, match=r"window_targets must hold image-token indices in \[0, 9\)"):
        model(**bad)


def test_variant_names():
    from lare_hf.reproduction import VARIANTS, variant

    assert {"k0", "cot", "lare", "lare_answer", "lare_steps"} <= set(VARIANTS)
    assert variant("k0").num_latent_steps == 0 and variant("cot").response_format == "reasoning"
    assert variant("lare").response_format == "reasoning" and variant("lare").latent_losses
    no_sym = variant("no_sym", "lare_steps")
    assert no_sym.overrides == {"sym_loss_weight": 0.0} and no_sym.step_supervision
    # the ablations modify the paper's LaRe unless told otherwise, as benchmarks/reproduce.py does
    no_img = variant("no_img")
    assert no_img.response_format == "reasoning" and no_img.description.startswith("lare w/o")
    for name in ("lare_answer", "lare_coconut"):
        assert "not in the paper" in VARIANTS[name].description
    assert variant("lare_answer_k2").num_latent_steps == 2 and variant("lare_steps_k3").step_supervision
    grounded = variant("lare_grounded_k2")
    assert grounded.num_latent_steps == 2 and grounded.overrides == {"window_loss_weight": 1.0}
    assert grounded.response_format == "answer"
    with pytest.raises(ValueError, match="Unknown variant 'lare_k'"):
        variant("lare_k")
    with pytest.raises(ValueError, match="K must be in 1..8, got 9"):
        variant("lare_k9")
    with pytest.raises(ValueError, match="ablation_base must be a LaRe variant"):
        variant("no_img", "k0")


@pytest.mark.parametrize(
    "name", ["k0", "cot", "lare", "lare_answer", "lare_steps", "lare_grounded", "no_extractor", "no_window"]
)
def test_every_variant_trains_and_evaluates(tmp_path, name):
    from lare_hf.reproduction import run_variant, variant

    paths = write_refocus_chains(tmp_path / "data", 8, 4, seed=0, hops=(1, 2))
    result = run_variant(variant(name), paths, tmp_path / name, steps=2, batch_size=4, learning_rate=1e-3)
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
    assert 0.0 <= result["accuracy"] <= 100.0 and set(result["accuracy_by_hops"]) == {"1", "2"}
    assert len(result["rows"]) == 4
    if variant(name).num_latent_steps:
        assert set(result["window_hit_rate_by_step"]) <= {1, 2} and 0 <= result["window_hit_rate"] <= 100
        assert all(len(row["windows"]) == 4 for row in result["rows"])
    else:
        assert "window_hit_rate" not in result


def test_alignment_initialises_the_variants(tmp_path):
    import torch

    from lare_hf.reproduction import train_alignment, train_variant, variant

    paths = write_refocus_chains(tmp_path / "data", 8, 2, seed=0, num_captions=8)
    state, summary = train_alignment(paths["captions"], tmp_path / "align", steps=2, batch_size=4)
    assert len(summary["losses"]) == 2
    model, _, _ = train_variant(
        variant("lare_steps"),
        paths["train"],
        tmp_path / "v",
        steps=1,
        batch_size=2,
        learning_rate=0.0,
        init_state=state,
    )
    key = "model.vision_tower.embeddings.patch_embedding.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_mean_std_ci():
    from lare_hf.reproduction import mean_std_ci

    stats = mean_std_ci([10.0, 20.0, 30.0])
    assert stats["mean"] == 20.0 and math.isclose(stats["std"], 10.0)
    assert math.isclose(stats["ci_high"] - 20.0, 10.0 / math.sqrt(3) * 4.302652729911275, rel_tol=1e-6)
    assert mean_std_ci([5.0])["ci_low"] is None and mean_std_ci([])["mean"] is None


def _load_script(name: str = "reproduce"):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reproduce_script_writes_the_results_schema(tmp_path):
    script = _load_script()
    argv = ["--output", str(tmp_path), "--seeds", "0", "1", "--variants", "k0", "lare_steps", "no_sym",
            "--num-train", "12", "--num-test", "6", "--num-captions", "8", "--align-steps", "2", "--steps", "2",
            "--batch-size", "4", "--hops", "1", "2", "--curriculum-steps", "1"]  # fmt: skip
    assert script.main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["config"]["curriculum_steps"] == 1
    seed_report = json.loads((tmp_path / "seed1" / "results.json").read_text())
    assert {run["curriculum_steps"] for run in seed_report["variants"].values()} == {1}
    assert set(report["variants"]) == {"k0", "lare_steps", "no_sym"} and report["seeds"] == [0, 1]
    for name, entry in report["variants"].items():
        assert 0 <= entry["accuracy"] <= 100 and set(entry["accuracy_by_hops"]) == {"1", "2"}
        assert entry["train_seconds"] > 0 and len(entry["accuracy_ci95"]) == 2
        assert (entry["window_hit_rate"] is None) == (name == "k0")
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "| lare_steps | 4 | answer |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "seed1" / "predictions_no_sym.jsonl").is_file()
    assert script.main(argv) == 2  # results are never overwritten without --overwrite


def test_reproduce_script_checks_the_curriculum_before_training(tmp_path, capsys):
    script = _load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--output", str(tmp_path), "--steps", "10", "--curriculum-steps", "11"])
    assert "--curriculum-steps must be in 0..--steps (10), got 11" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--output", str(tmp_path), "--hops", "2", "3", "--curriculum-steps", "5"])
    assert "--curriculum-steps needs one-hop questions; add 1 to --hops (got [2, 3])" in capsys.readouterr().err
    assert script.parse_args(["--output", str(tmp_path), "--curriculum-steps", "200"]).curriculum_steps == 200


def test_alignment_stage_script_reports_each_run(tmp_path, capsys):
    script = _load_script("alignment_stage")
    argv = ["--seeds", "0", "--learning-rates", "1e-3", "3e-3", "--steps", "2", "--num-captions", "8",
            "--output", str(tmp_path)]  # fmt: skip
    assert script.main(argv) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"seed"')]
    assert [run["learning_rate"] for run in runs] == [1e-3, 3e-3]
    for run in runs:
        assert [step for step, _ in run["loss_curve"]] == [1, 2] and run["break_through_step"] is None
        assert 0 <= run["held_out_mark_accuracy"] <= 100


def test_cli_writes_refocus_chains(tmp_path, capsys):
    from lare_hf.cli import main

    out = tmp_path / "chains"
    argv = ["data", "synth", "--output", str(out), "--num-train", "4", "--num-test", "2", "--hops", "1", "3",
            "--layout", "random", "--num-captions", "6", "--caption-lookup-fraction", "1"]  # fmt: skip
    assert main(argv) == 0
    assert {p.name for p in out.glob("*.jsonl")} == {"train.jsonl", "test.jsonl", "captions.jsonl"}
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 6 and all(c["question"].startswith("What is the mark of the ") for c in captions)
    hops = [json.loads(line)["hops"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert hops == [1, 3, 1, 3]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # never overwritten without being asked


def test_curriculum_trains_one_hop_questions_first(tmp_path):
    from lare_hf.reproduction import one_hop_file, train_variant, variant

    paths = write_refocus_chains(tmp_path / "data", 8, 2, seed=0, hops=(1, 2))
    first = one_hop_file(paths["train"])
    assert [json.loads(line)["hops"] for line in open(first)] == [1] * 4
    _, _, summary = train_variant(
        variant("k0"), paths["train"], tmp_path / "k0", steps=2, batch_size=2, curriculum_steps=1
    )
    assert len(summary["losses"]) == 2
    with pytest.raises(ValueError, match=r"curriculum_steps must be in 0..steps \(2\), got 3"):
        train_variant(variant("k0"), paths["train"], tmp_path / "x", steps=2, curriculum_steps=3)
    with pytest.raises(ValueError, match="no one-hop record"):
        one_hop_file(write_refocus_chains(tmp_path / "long", 2, 1, hops=(3,))["train"])


def test_chain_rationale_after_leaves_the_first_hops_to_the_latents():
    example = {"id": "x", "rationale": "path: red blue cyan"}
    assert [chain_rationale_after(c)(example) for c in range(4)] == [
        "path: red blue cyan",
        "path: blue cyan",
        "path: cyan",
        "path: cyan",  # every hop replaced: the colour reached stays
    ]
    with pytest.raises(ValueError, match="replaced_hops must be an integer >= 0, got -1"):
        chain_rationale_after(-1)


def test_collator_writes_the_response_rationale_and_keeps_the_full_one_for_the_latent_losses(tmp_path):
    from lare_hf.data.collator import LaReDataCollator
    from lare_hf.data.formats import load_records
    from lare_hf.reproduction import build_chains_model

    _, processor = build_chains_model()
    loaded = load_records(write_refocus_chains(tmp_path, 4, 1, seed=0, hops=(3,))["train"])
    records = [loaded[0], loaded[1]]
    staged = LaReDataCollator(processor=processor, num_latent_steps=1, response_rationale=chain_rationale_after(1))
    full = LaReDataCollator(processor=processor, num_latent_steps=1)
    staged_batch, full_batch = staged(records), full(records)
    tokenizer = processor.tokenizer
    for row, record in enumerate(records):
        written = tokenizer.decode(staged_batch["input_ids"][row][staged_batch["labels"][row] != -100])
        path = record["rationale"].split()[1:]
        assert written.startswith("path: " + " ".join(path[1:]) + "\nAnswer: " + record["answer"])
    assert (staged_batch["rationale_input_ids"] == full_batch["rationale_input_ids"]).all()


def test_coconut_variant_trains_stage_by_stage(tmp_path):
    from lare_hf.reproduction import _phases, run_variant, train_variant, variant

    paths = write_refocus_chains(tmp_path / "data", 8, 4, seed=0, hops=(1, 2))
    spec = variant("lare_coconut_k2")
    phases = _phases(spec, paths["train"], steps=7, curriculum_steps=0)
    assert [
        (steps, stage.num_latent_steps, stage.response_format, stage.latent_losses) for _, steps, stage, _ in phases
    ] == [
        (2, 0, "reasoning", False),  # stage 0: chain of thought
        (2, 1, "reasoning", True),
        (3, 2, "answer", True),  # the last stage is lare_answer itself
    ]
    assert phases[1][3]({"rationale": "path: red blue cyan"}) == "path: blue cyan" and phases[2][3] is None
    result = run_variant(spec, paths, tmp_path / "coconut", steps=3, batch_size=4, learning_rate=1e-3)
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["num_latent_steps"] == 2 and set(result["window_hit_rate_by_step"]) <= {1, 2}
    assert [(p["name"], p["steps"], p["num_latent_steps"]) for p in result["phases"]] == [
        ("lare_coconut_k2_stage0", 1, 0),
        ("lare_coconut_k2_stage1", 1, 1),
        ("lare_coconut_k2", 1, 2),
    ]
    assert all(math.isfinite(p["final_lm_loss"]) for p in result["phases"])
    with pytest.raises(ValueError, match="has its own curriculum"):
        train_variant(spec, paths["train"], tmp_path / "x", steps=3, curriculum_steps=1)
