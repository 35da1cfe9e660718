"""The paper's analyses (`lare_hf.analysis`) and adaptive halting of the latent loop (Table 4), on `lare-tiny`."""

from __future__ import annotations

import pytest
import torch

from conftest import chat, make_image

QUESTIONS = ["what digit?", "which container is on the left of the blue circle today?", "how many?"]


def prompts(processor, questions: list[str], seeds: list[int], num_latent_steps: int):
    texts = [
        processor.apply_chat_template(
            chat(make_image(seed), question), add_generation_prompt=True, tokenize=False,
            num_latent_steps=num_latent_steps,
        )
        for question, seed in zip(questions, seeds)
    ]  # fmt: skip
    return processor(text=texts, images=[make_image(seed) for seed in seeds], padding=True, return_tensors="pt")


GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)


def new_logits(output, row: int) -> torch.Tensor:
    return torch.stack(output.logits, dim=1)[row]


# --------------------------------------------------------------------------------------------- adaptive halting


@pytest.mark.parametrize("criterion, threshold", [("cosine", 0.95), ("l2", 0.012)])
def test_halting_equals_a_run_with_that_many_steps_alone_and_in_a_batch(
    tiny_model_and_processor, criterion, threshold
):
    model, processor = tiny_model_and_processor
    seeds = [1, 2, 3]
    batch = prompts(processor, QUESTIONS, seeds, num_latent_steps=6)
    halted = model.generate(**batch, latent_halting=criterion, latent_halting_threshold=threshold, **GREEDY)
    steps = halted.latent_steps.tolist()
    # samples of one batch stop at their own step, up to the cap max_latent_steps=8 (not the prompt's 6 slots)
    assert len(set(steps)) > 1 and min(steps) >= 2 and max(steps) <= 8
    length = batch["input_ids"].shape[1]
    for row, (question, seed) in enumerate(zip(QUESTIONS, seeds)):
        single = prompts(processor, [question], [seed], num_latent_steps=6)
        fixed = model.generate(**single, num_latent_steps=steps[row], **GREEDY)
        alone = model.generate(**single, latent_halting=criterion, latent_halting_threshold=threshold, **GREEDY)
        single_length = single["input_ids"].shape[1]
        assert alone.latent_steps.tolist() == [steps[row]]
        expected = fixed.sequences[0, single_length:].tolist()
        assert halted.sequences[row, length:].tolist() == expected == alone.sequences[0, single_length:].tolist()
        torch.testing.assert_close(new_logits(halted, row), new_logits(fixed, 0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new_logits(alone, 0), new_logits(fixed, 0), atol=1e-5, rtol=1e-5)
        if steps[row] < 8:  # the comparison can fail: all eight steps give other logits
            full = model.generate(**single, num_latent_steps=8, **GREEDY)
            assert (new_logits(full, 0) - new_logits(fixed, 0)).abs().max() > 1e-3


def test_halting_when_every_sample_stops_at_step_two(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = prompts(processor, QUESTIONS[:2], [4, 5], num_latent_steps=5)
    halted = model.generate(**batch, latent_halting="l1", latent_halting_threshold=1e6, **GREEDY)
    fixed = model.generate(**batch, num_latent_steps=2, **GREEDY)
    assert halted.latent_steps.tolist() == [2, 2]
    torch.testing.assert_close(torch.stack(halted.logits, 1), torch.stack(fixed.logits, 1), atol=1e-5, rtol=1e-5)
    # the latent phase stopped: two steps computed, not five
    out = model(**batch, latent_halting="l1", latent_halting_threshold=1e6)
    assert out.latent_embeds.shape[1] == 2 and out.latent_steps.tolist() == [2, 2]
    never = model(**batch, latent_halting="cosine", latent_halting_threshold=1.0)
    assert never.latent_embeds.shape[1] == 5 and never.latent_steps.tolist() == [5, 5]


def test_halting_without_cache_gives_the_same_answer(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = prompts(processor, QUESTIONS, [1, 2, 3], num_latent_steps=6)
    halting = dict(latent_halting="cosine", latent_halting_threshold=0.95)
    cached = model.generate(**batch, **halting, **GREEDY)
    uncached = model.generate(**batch, **halting, use_cache=False, **GREEDY)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), atol=1e-5, rtol=1e-5)


def test_halting_arguments_are_checked(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch = prompts(processor, QUESTIONS[:1], [1], num_latent_steps=3)
    with pytest.raises(ValueError, match="latent_halting must be one of .*'cosine'.*got 'cos'"):
        model.generate(**batch, latent_halting="cos", latent_halting_threshold=0.9)
    with pytest.raises(ValueError, match="needs latent_halting_threshold"):
        model.generate(**batch, latent_halting="l2")
    with pytest.raises(ValueError, match=r"cosine similarity .*\[-1, 1\], got 1.5"):
        model.generate(**batch, latent_halting="cosine", latent_halting_threshold=1.5)
    with pytest.raises(ValueError, match="distance for 'l1'.*got -0.1"):
        model.generate(**batch, latent_halting="l1", latent_halting_threshold=-0.1)
    with pytest.raises(ValueError, match="without latent_halting"):
        model.generate(**batch, latent_halting_threshold=0.5)
    with pytest.raises(ValueError, match="must be a number, got 'high'"):
        model.generate(**batch, latent_halting="l2", latent_halting_threshold="high")
    with pytest.raises(ValueError, match="static cache"):
        model.generate(**batch, latent_halting="l2", latent_halting_threshold=0.1, cache_implementation="static")
    with pytest.raises(ValueError, match="inference option"):
        model(**batch, labels=batch["input_ids"], latent_halting="l2", latent_halting_threshold=0.1)


# ------------------------------------------------------------------------------------------ analyses on RefocusChains


@pytest.fixture(scope="module")
def chains_data(tmp_path_factory) -> str:
    from lare_hf.data.refocus_chains import write_refocus_chains

    root = tmp_path_factory.mktemp("chains")
    return write_refocus_chains(root, num_train=0, num_test=6, seed=3)["test"]


@pytest.fixture(scope="module")
def chains_samples(chains_data):
    from lare_hf.analysis import load_samples

    return load_samples("refocus_chains", chains_data)


@pytest.fixture(scope="module")
def chains_checkpoint(tmp_path_factory) -> str:
    """A random-init model with the reproduction's RefocusChains shape: one 8-px patch per board cell."""
    from lare_hf.build import save_checkpoint
    from lare_hf.reproduction import build_chains_model

    model, processor = build_chains_model(seed=1)
    path = tmp_path_factory.mktemp("chains-model")
    save_checkpoint(model, processor, str(path))
    return str(path)


def is_png(path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fig5_draws_the_tokens_of_correct_answers(tmp_path):
    """Fig. 5's "# tokens" is over the correct answers (the paper's tables); a K with none correct has no point."""
    from lare_hf.analysis import plot_steps_sweep, steps_sweep_series

    rows = [
        {"num_latent_steps": 0, "accuracy": 0.0, "avg_tokens": 9.0, "avg_tokens_correct": None},
        {"num_latent_steps": 2, "accuracy": 50.0, "avg_tokens": 7.0, "avg_tokens_correct": 4.0},
        {"num_latent_steps": 4, "accuracy": 75.0, "avg_tokens": 6.0, "avg_tokens_correct": 5.5},
    ]
    series = steps_sweep_series({"rows": rows})
    assert series == {"num_latent_steps": [0, 2, 4], "accuracy": [0.0, 50.0, 75.0], "tokens_correct": [None, 4.0, 5.5]}
    assert is_png(plot_steps_sweep({"rows": rows, "benchmark": "b"}, tmp_path / "steps.png"))


def test_steps_sweep_rows_are_deterministic_and_match_the_evaluation(
    tiny_model_and_processor, chains_samples, tmp_path
):
    from lare_hf.analysis import latent_steps_sweep, plot_steps_sweep
    from lare_hf.evaluation.runner import generate_answers

    model, processor = tiny_model_and_processor
    bench, samples = chains_samples
    report = latent_steps_sweep(model, processor, bench, samples, steps=[0, 2], batch_size=4, max_new_tokens=4)
    again = latent_steps_sweep(model, processor, bench, samples, steps=[0, 2], batch_size=3, max_new_tokens=4)
    assert [row["num_latent_steps"] for row in report["rows"]] == [0, 2]
    for row, other in zip(report["rows"], again["rows"]):
        assert {k: v for k, v in row.items() if k != "seconds"} == {k: v for k, v in other.items() if k != "seconds"}
    texts, counts, _ = generate_answers(model, processor, samples, 2, 6, 4, progress=False)
    row = report["rows"][1]
    assert row["accuracy"] == bench.score(samples, texts)["accuracy"]
    assert row["avg_tokens"] == pytest.approx(sum(counts) / len(counts)) and row["avg_latent_steps"] == 2
    assert row["num_samples"] == len(samples)
    assert is_png(plot_steps_sweep(report, tmp_path / "steps.png"))
    with pytest.raises(ValueError, match="steps must be in 0..max_latent_steps=8 .* got 9"):
        latent_steps_sweep(model, processor, bench, samples, steps=[9])


def test_halting_table_rows(tiny_model_and_processor, chains_samples, tmp_path):
    from lare_hf.analysis import halting_analysis, latent_step_distances, latent_steps_sweep, plot_halting

    model, processor = tiny_model_and_processor
    bench, samples = chains_samples
    distances = latent_step_distances(model, processor, samples, 4, batch_size=4)
    assert {name: values.shape for name, values in distances.items()} == {c: (6, 3) for c in ("cosine", "l1", "l2")}
    assert ((distances["cosine"] >= -1) & (distances["cosine"] <= 1)).all() and (distances["l2"] >= 0).all()
    thresholds = {"l1": [1e6], "cosine": [1.0], "l2": [float(distances["l2"].mean())]}
    report = halting_analysis(model, processor, bench, samples, 4, thresholds, batch_size=4, max_new_tokens=4)
    rows = {(row["criterion"], row["threshold"]): row for row in report["rows"]}
    assert len(rows) == 4 and rows[(None, None)]["avg_latent_steps"] == 4
    assert report["max_latent_steps"] == 8 and rows[(None, None)]["method"] == "LaRe (K=4)"
    assert rows[("l1", 1e6)]["avg_latent_steps"] == 2  # every sample halts at the first check
    # Table 4: the adaptive rows run past the fixed K, up to the cap max_latent_steps (8 in lare-tiny)
    assert rows[("cosine", 1.0)]["avg_latent_steps"] == 8  # none converges exactly
    assert rows[("cosine", 1.0)]["max_latent_steps"] == 8
    assert 2 <= rows[("l2", thresholds["l2"][0])]["avg_latent_steps"] <= 8
    sweep = latent_steps_sweep(model, processor, bench, samples, steps=[2, 4], batch_size=4, max_new_tokens=4)
    for halting_row, sweep_row in ((rows[("l1", 1e6)], sweep["rows"][0]), (rows[(None, None)], sweep["rows"][1])):
        assert halting_row["accuracy"] == sweep_row["accuracy"]
        assert halting_row["avg_tokens"] == sweep_row["avg_tokens"]
    assert list(report["step_distance_by_step"]["l2"]) == list(range(2, 9))
    capped = halting_analysis(
        model, processor, bench, samples, [2, 4], {"cosine": [1.0]}, batch_size=4, max_new_tokens=4,
        max_latent_steps=5,
    )  # fmt: skip
    assert [(row["method"], row["avg_latent_steps"]) for row in capped["rows"]] == [
        ("LaRe (K=2)", 2), ("LaRe (K=4)", 4), ("+ Adaptive (cosine, t=1, cap 5)", 5),
    ]  # fmt: skip
    assert is_png(plot_halting(report, tmp_path / "halting.png"))
    with pytest.raises(ValueError, match="latent_halting must be one of"):
        halting_analysis(model, processor, bench, samples, 4, {"l3": [0.1]})


def test_attention_to_image_matches_a_full_forward(tiny_checkpoint, tiny_model_and_processor, chains_samples):
    from transformers import AutoModelForImageTextToText

    from lare_hf.analysis import attention_to_image, compare_attention
    from lare_hf.analysis.common import prompt_inputs

    _, processor = tiny_model_and_processor
    eager = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    _, samples = chains_samples
    scores = attention_to_image(eager, processor, samples, num_latent_steps=2, batch_size=4)
    assert scores.shape == (len(samples),) and ((scores > 0) & (scores < 100)).all()
    rebatched = attention_to_image(eager, processor, samples, 2, batch_size=6)  # other padding, same values
    assert abs(scores - rebatched).max() < 1e-3
    # independently: one forward over prompt + first token, its last row of every layer's attention
    inputs = prompt_inputs(eager, processor, samples[:1], 2)
    first = eager.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1:]
    with torch.no_grad():
        out = eager(
            input_ids=torch.cat([inputs["input_ids"], first], 1),
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(first)], 1),
            pixel_values=inputs["pixel_values"],
            output_attentions=True,
        )
    image = torch.cat(
        [inputs["input_ids"] == eager.config.image_token_id, torch.zeros_like(first, dtype=torch.bool)], 1
    )
    expected = torch.stack([layer[0, :, -1][:, image[0]].sum(-1) for layer in out.attentions]).mean() * 100
    assert scores[0] == pytest.approx(float(expected), abs=1e-3)
    model, _ = tiny_model_and_processor
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        attention_to_image(model, processor, samples, 2)
    table = compare_attention(scores + 10.0, scores)
    assert table["lare"]["mean"] == pytest.approx(table["baseline"]["mean"] + 10.0, abs=1e-4)
    assert table["t_test"]["p_value"] < 1e-3 and table["mann_whitney_u"]["p_value"] < 0.01
    assert compare_attention(scores, scores)["t_test"]["p_value"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- probing


def toy_probe_inputs(count: int = 400, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    latents = rng.normal(size=(count, 32))
    partners = latents @ rng.normal(size=(32, 24)) + 0.1 * rng.normal(size=(count, 24))
    return latents, partners, [i // 2 for i in range(count)], [i % 20 for i in range(count)]


def test_probe_pairs_follow_the_protocol():
    from lare_hf.analysis import build_probe_pairs

    images = [i // 4 for i in range(1200)]
    questions = [i % 50 for i in range(1200)]
    pairs = build_probe_pairs(images, questions, num_pairs=1000, seed=0)
    assert len(pairs["label"]) == 1000 and pairs["label"].sum() == 500
    assert len(set(zip(pairs["latent"].tolist(), pairs["partner"].tolist()))) == 1000
    kinds = pairs["kind"].tolist()
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "positive": 500, "same_image": 167, "same_question": 167, "random": 166,
    }  # fmt: skip
    for i, j, kind in zip(pairs["latent"], pairs["partner"], kinds):
        assert (i == j) == (kind == "positive")
        if kind == "same_image":
            assert images[i] == images[j] and questions[i] != questions[j]
        if kind == "same_question":
            assert questions[i] == questions[j] and images[i] != images[j]
    again = build_probe_pairs(images, questions, num_pairs=1000, seed=0)
    assert all((pairs[key] == again[key]).all() for key in pairs)
    assert (pairs["substituted"] == "").all()


def test_probe_random_negatives_are_in_batch_and_missing_kinds_are_reported():
    from lare_hf.analysis import build_probe_pairs, run_probes

    images = [i // 4 for i in range(1200)]
    questions = [i % 50 for i in range(1200)]
    pairs = build_probe_pairs(images, questions, num_pairs=1000, seed=0, batch_size=16)
    random = pairs["kind"] == "random"
    assert random.sum() == 166 and (pairs["latent"][random] // 16 == pairs["partner"][random] // 16).all()
    with pytest.raises(ValueError, match="batch_size .* must be an integer >= 2 or None, got 1"):
        build_probe_pairs(images, questions, batch_size=1)
    # every sample its own image: no same-image negative exists; those pairs are replaced and reported
    latents, partners, _, questions = toy_probe_inputs()
    lonely = list(range(len(latents)))
    with pytest.warns(UserWarning, match=r"\{'same_image': \d+\} negatives .* no candidate"):
        report = run_probes(latents, partners, lonely, questions, num_pairs=400, seed=0, batch_size=16)
    assert report["negatives_substituted"]["same_image"] == report["pair_kinds"]["random"] - 66
    assert "same_image" not in report["pair_kinds"]


def test_probes_above_chance_on_separable_pairs_and_at_chance_on_shuffled_labels():
    from lare_hf.analysis import run_probes

    latents, partners, images, questions = toy_probe_inputs()
    report = run_probes(latents, partners, images, questions, num_pairs=400, seed=0)
    assert report["num_train"] == 280 and report["num_test"] == 120
    assert report["svm"]["accuracy"] > 85 and report["mlp"]["accuracy"] > 85
    shuffled = run_probes(latents, partners, images, questions, num_pairs=400, seed=0, shuffle_labels=True)
    assert 35 < shuffled["svm"]["accuracy"] < 65 and 35 < shuffled["mlp"]["accuracy"] < 65


def test_probe_features_from_the_model(tiny_model_and_processor, chains_data):
    from lare_hf.analysis import probe_features, refocus_chains_probe_records

    model, processor = tiny_model_and_processor
    records = refocus_chains_probe_records(chains_data, hops=(1, 2), limit=3)
    assert len(records) == 6 and records[0]["image"] is records[1]["image"]
    assert records[1]["question"] == "From the red cell, follow 2 marks."
    features = probe_features(model, processor, records, num_latent_steps=2, batch_size=4)
    width = 2 * model.config.text_config.hidden_size
    assert {name: features[name].shape for name in ("latents", "vision", "text")} == {
        name: (6, width) for name in ("latents", "vision", "text")
    }
    assert features["image_ids"][0] == features["image_ids"][1] != features["image_ids"][2]
    again = probe_features(model, processor, records, num_latent_steps=2, batch_size=6)
    assert abs(features["latents"] - again["latents"]).max() < 1e-4


# ---------------------------------------------------------------------------------------------------- figures


def test_fig3_draws_the_extractor_attention_inside_the_window_and_the_generated_text(
    tiny_model_and_processor, chains_samples, tmp_path
):
    from lare_hf.analysis import refocus_figure, refocus_record
    from lare_hf.visualization import extractor_attention_maps

    model, processor = tiny_model_and_processor
    _, samples = chains_samples
    record = refocus_record(model, processor, samples[:3], 2, return_extractor_attention=True)
    attention = record["extractor_attentions"]  # [N, K, m, window tokens]: lare-tiny's m = 2, window 4x4
    assert attention.shape == (3, 2, 2, 16)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 2, 2))
    maps = extractor_attention_maps(attention, record["window_positions"], 4, 8)
    for i in range(3):
        for k in range(2):
            row, col = record["window_positions"][i, k].tolist()
            inside = maps[i, k, row : row + 4, col : col + 4]
            torch.testing.assert_close(inside.flatten(), attention[i, k].mean(0))
            assert maps[i, k].sum() == pytest.approx(1.0, abs=1e-5)  # nothing outside the window
    assert "extractor_attentions" not in refocus_record(model, processor, samples[:1], 2)
    path = refocus_figure(model, processor, samples[:2], tmp_path / "fig3.png", num_latent_steps=2, max_new_tokens=3)
    assert is_png(path)
    from PIL import Image

    with_attention = Image.open(path).size
    from lare_hf.visualization import plot_refocus_grid

    without = plot_refocus_grid(
        [s.image for s in samples[:2]], record["saliency_maps"][:2], record["window_positions"][:2], 4,
        str(tmp_path / "plain.png"), titles=["a", "b"],
    )  # fmt: skip
    assert with_attention[1] > 1.8 * Image.open(without).size[1]  # a second row per sample: the Extractor's heatmap


def test_figures_and_window_hits(chains_checkpoint, chains_samples, tiny_model_and_processor, tmp_path):
    from lare_hf.analysis import (
        load_model,
        plot_window_hits,
        reconstruction_figure,
        refocus_figure,
        refocus_record,
        window_hit_rates,
    )
    from lare_hf.data.refocus_chains import window_hits

    model, processor = load_model(chains_checkpoint)
    _, samples = chains_samples
    assert is_png(refocus_figure(model, processor, samples[:2], tmp_path / "fig3.png", num_latent_steps=3))
    assert is_png(
        reconstruction_figure(model, processor, samples[:2], tmp_path / "fig4.png", 2, num_inference_steps=2)
    )
    report = window_hit_rates(model, processor, samples, num_latent_steps=3)
    windows = refocus_record(model, processor, samples, 3)["window_positions"]
    assert windows.shape == (len(samples), 3, 2)
    step_one = [window_hits(w, s.meta["visited_cells"], 1)[0] for w, s in zip(windows.tolist(), samples)]
    assert report["window_hit_rate_by_step"][1] == pytest.approx(100.0 * sum(step_one) / len(step_one))
    assert report["num_samples_by_step"][1] == len(samples)
    assert is_png(plot_window_hits(report, tmp_path / "hits.png"))
    tiny, tiny_processor = tiny_model_and_processor
    with pytest.raises(ValueError, match="one patch per cell"):
        window_hit_rates(tiny, tiny_processor, samples, 2)


# -------------------------------------------------------------------------------------------------------- CLI


def test_lare_analyze_commands_write_reports_and_figures(
    tiny_checkpoint, chains_checkpoint, chains_data, tmp_path, capsys
):
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lare_hf.build import save_checkpoint
    from lare_hf.cli import main

    baseline = tmp_path / "k0"  # the K=0 model (here: the same weights, prompts without latent steps)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    processor.num_latent_steps = 0
    save_checkpoint(AutoModelForImageTextToText.from_pretrained(tiny_checkpoint), processor, str(baseline))
    common = ["--data", chains_data, "--max-new-tokens", "3", "--batch-size", "3"]
    runs = {
        "steps": ["--model", tiny_checkpoint, "--steps", "0", "2"],
        "halting": ["--model", tiny_checkpoint, "--num-latent-steps", "3", "--thresholds", "cosine=0.9", "l2=0.02,1"],
        "attention": ["--model", tiny_checkpoint, "--baseline", str(baseline), "--num-latent-steps", "2"],
        "probing": ["--model", tiny_checkpoint, "--num-latent-steps", "2", "--num-pairs", "20", "--hops", "1", "2"],
        "figures": ["--model", chains_checkpoint, "--num-samples", "2", "--num-inference-steps", "2"],
    }
    pngs = {"steps": ["steps.png"], "halting": ["halting.png"], "attention": ["attention.png"],
            "probing": ["probing.png"], "figures": ["fig3_refocus.png", "fig4_reconstruction.png", "window_hits.png"]}  # fmt: skip
    for name, arguments in runs.items():
        output = tmp_path / name
        assert main(["analyze", name, *arguments, *common, "--output", str(output)]) == 0
        report = json.loads((output / f"{name}.json").read_text())
        assert report["model"] == arguments[1]
        assert all(is_png(output / png) for png in pngs[name])
    steps = json.loads((tmp_path / "steps" / "steps.json").read_text())
    assert [row["num_latent_steps"] for row in steps["rows"]] == [0, 2]
    halting = json.loads((tmp_path / "halting" / "halting.json").read_text())
    assert [(row["criterion"], row["threshold"]) for row in halting["rows"]] == [
        (None, None), ("cosine", 0.9), ("l2", 0.02), ("l2", 1.0),
    ]  # fmt: skip
    attention = json.loads((tmp_path / "attention" / "attention.json").read_text())
    assert attention["lare"]["n"] == attention["baseline"]["n"] == 6 and 0 <= attention["t_test"]["p_value"] <= 1
    assert attention["baseline_model"] == str(baseline) and attention["baseline_num_latent_steps"] == 0
    probing = json.loads((tmp_path / "probing" / "probing.json").read_text())
    assert probing["lare"]["vision"]["num_pairs"] == 20 and "mlp" in probing["lare"]["text"]
    figures = json.loads((tmp_path / "figures" / "figures.json").read_text())
    assert set(figures["window_hits"]["window_hit_rate_by_step"]) == {"1", "2", "3", "4"}
    # an existing report is not overwritten without --overwrite
    capsys.readouterr()
    assert main(["analyze", "steps", *runs["steps"], *common, "--output", str(tmp_path / "steps")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["analyze", "steps", *runs["steps"], *common, "--output", str(tmp_path / "steps"), "--overwrite"]) == 0
    assert main(["analyze", "halting", *runs["steps"][:2], *common, "--output", str(tmp_path / "bad"),
                 "--thresholds", "cosine=high"]) == 2  # fmt: skip
    assert "--thresholds expects criterion=t1,t2" in capsys.readouterr().err
