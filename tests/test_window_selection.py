"""The label-free window selections (not in the paper; `LaReConfig.window_selection`): their estimators, that the
answer's gradient reaches the saliency through them and not through the argmax, that inference is unchanged, the
temperature schedule, and a few training steps of each reproduction variant."""

from __future__ import annotations

import math

import pytest
import torch

from lare_hf.data.refocus_chains import write_refocus_chains
from lare_hf.modeling.refocus import relaxed_window_features, select_windows, window_candidates
from lare_hf.training.window_selection import scheduled_window_temperature

RELAXED = ("straight_through", "gumbel", "soft")


def test_candidates_follow_select_windows_and_each_estimator_its_equation():
    torch.manual_seed(0)
    grid, size, stride = 4, 2, 1
    saliency = torch.rand(3, grid * grid)
    features = torch.randn(3, grid * grid, 5)
    positions, tokens = window_candidates(grid, size, stride, saliency.device)
    assert positions.shape == (9, 2) and tokens.shape == (9, 4)
    best_positions, best_tokens = select_windows(saliency, grid, size, stride)
    pooled = saliency[:, tokens].sum(-1)  # s_j, the sum-pooled saliency of each candidate
    assert torch.equal(positions[pooled.argmax(-1)], best_positions)
    assert torch.equal(tokens[pooled.argmax(-1)], best_tokens)
    argmax_features = features.gather(1, best_tokens.unsqueeze(-1).expand(-1, -1, 5))
    for temperature in (1.0, 0.3):
        expected_weights = (pooled.log() / temperature).softmax(-1)  # p_j ∝ s_j^(1/tau)
        expectation = torch.einsum("bn,bntd->btd", expected_weights, features[:, tokens])
        st_positions, st_features, weights = relaxed_window_features(
            saliency, features, grid, size, stride, "straight_through", temperature
        )
        torch.testing.assert_close(weights, expected_weights)
        assert torch.equal(st_positions, best_positions) and torch.equal(st_features, argmax_features)
        soft_positions, soft_features, _ = relaxed_window_features(
            saliency, features, grid, size, stride, "soft", temperature
        )
        assert torch.equal(soft_positions, best_positions)
        torch.testing.assert_close(soft_features, expectation)
    # Gumbel: a sampled window, forwarded exactly; its weights are a softmax, sharper at a low temperature
    picks = set()
    for seed in range(20):
        torch.manual_seed(seed)
        gumbel_positions, gumbel_features, weights = relaxed_window_features(
            saliency, features, grid, size, stride, "gumbel", 0.05
        )
        index = (gumbel_positions[:, 0] * (grid - size + 1) + gumbel_positions[:, 1]).long()
        assert torch.equal(gumbel_features, features[torch.arange(3)[:, None], tokens[index]])
        assert torch.equal(weights.argmax(-1), index) and bool((weights.max(-1).values > 0.5).all())
        picks.add(tuple(index.tolist()))
    assert len(picks) > 1  # noise: not always the argmax
    with pytest.raises(ValueError, match="selection must be one of"):
        relaxed_window_features(saliency, features, grid, size, stride, "argmax", 1.0)


@pytest.fixture(scope="module")
def chains_batch(tmp_path_factory):
    from lare_hf.data.collator import LaReDataCollator
    from lare_hf.data.formats import load_records
    from lare_hf.reproduction import build_chains_model

    paths = write_refocus_chains(tmp_path_factory.mktemp("chains"), 6, 2, seed=0, hops=(2, 3))
    _, processor = build_chains_model()
    collate = LaReDataCollator(processor=processor, num_latent_steps=3, response_format="answer")
    records = load_records(paths["train"])
    return collate([records[index] for index in range(4)]), paths


def _answer_loss_gradients(selection: str | None, batch):
    """One training forward of a fresh chains model (seed 0) and the answer loss's backward."""
    from lare_hf.reproduction import build_chains_model

    overrides = {} if selection is None else {"window_selection": selection}
    model, _ = build_chains_model(overrides, seed=0)
    model.train()
    torch.manual_seed(0)
    outputs = model(**batch, compute_latent_losses=False)
    outputs.lm_loss.backward()
    return model, outputs


@pytest.mark.parametrize("selection", RELAXED)
def test_answer_gradient_reaches_the_saliency_through_each_estimator(chains_batch, selection):
    batch, _ = chains_batch
    model, outputs = _answer_loss_gradients(selection, batch)
    assert outputs.saliency_maps.requires_grad
    norms = model.model.window_selection_diagnostics["saliency_gradient_norm"]
    assert sorted(norms) == [0, 1, 2]  # every latent step's saliency gets the answer's gradient
    assert all(math.isfinite(n) and n > 0 for values in norms.values() for n in values), norms
    # ... and through it the LM attention that produced it: with the straight-through estimator the forward is the
    # argmax's, bit for bit, so the change of the query projection's gradient is the path through the saliency
    if selection == "straight_through":
        reference, reference_outputs = _answer_loss_gradients("argmax", batch)
        assert torch.equal(outputs.lm_loss, reference_outputs.lm_loss)
        for layer in range(model.config.text_config.num_hidden_layers):
            relaxed = model.model.language_model.layers[layer].self_attn.q_proj.weight.grad
            argmax = reference.model.language_model.layers[layer].self_attn.q_proj.weight.grad
            difference = (relaxed - argmax).norm()
            assert torch.isfinite(relaxed).all() and difference > 0, (layer, difference)


def test_argmax_passes_no_gradient_to_the_saliency(chains_batch):
    batch, _ = chains_batch
    model, outputs = _answer_loss_gradients("argmax", batch)
    assert not outputs.saliency_maps.requires_grad
    assert not getattr(model.model, "window_selection_diagnostics", None)


def test_inference_with_the_default_selection_is_unchanged(chains_batch):
    """Unset, "argmax" and any relaxed selection give the same forward and generate() bit for bit outside training:
    evaluation and inference always take the argmax window."""
    from lare_hf.reproduction import build_chains_model

    batch, _ = chains_batch
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    results = []
    for overrides in ({}, {"window_selection": "argmax"}, {"window_selection": "soft", "window_temperature": 0.3}):
        model, _ = build_chains_model(overrides, seed=0)
        model.eval()
        with torch.no_grad():
            outputs = model(**prompt)
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        results.append((outputs.logits, outputs.window_positions, outputs.saliency_maps, generated))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    # training mode with autograd off (e.g. a no_grad evaluation inside training) is the argmax too
    model.train()
    with torch.no_grad():
        assert torch.equal(model(**prompt).window_positions, results[0][1])


def test_relaxed_selection_refuses_gradient_checkpointing_and_runs_in_bfloat16(chains_batch):
    from lare_hf.reproduction import build_chains_model

    batch, _ = chains_batch
    model, _ = build_chains_model({"window_selection": "straight_through"}, seed=0)
    model.train()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="window_selection='straight_through' records the saliency inside autograd"):
        model(**batch, compute_latent_losses=False)
    model.gradient_checkpointing_disable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(**batch, compute_latent_losses=False)
    outputs.lm_loss.backward()
    diagnostics = model.model.window_selection_diagnostics
    norms = [n for values in diagnostics["saliency_gradient_norm"].values() for n in values]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms)


def test_window_temperature_is_checked_and_annealed_geometrically():
    from lare_hf.modeling.configuration_lare import LaReConfig

    with pytest.raises(ValueError, match="window_selection='hard' is not supported"):
        LaReConfig(window_selection="hard")
    with pytest.raises(ValueError, match="window_temperature"):
        LaReConfig(window_temperature=0.0)
    with pytest.raises(ValueError, match="window_temperature_end"):
        LaReConfig(window_temperature_end=-1.0)
    taus = [scheduled_window_temperature(1.0, 0.01, step, 5) for step in range(5)]
    assert taus[0] == 1.0 and math.isclose(taus[-1], 0.01)
    assert all(math.isclose(b / a, 0.01**0.25) for a, b in zip(taus, taus[1:]))


@pytest.mark.parametrize("name", ["lare_st_answer", "lare_gumbel_answer", "lare_soft_answer"])
def test_each_label_free_variant_trains_and_records_its_settings(tmp_path, chains_batch, name):
    from lare_hf.reproduction import RELAXED_WINDOW_TEMPERATURE, run_variant, variant

    _, paths = chains_batch
    result = run_variant(variant(name), paths, tmp_path / name, steps=3, batch_size=4, learning_rate=1e-3)
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["window_selection"] == variant(name).overrides["window_selection"] != "argmax"
    assert result["window_loss_weight"] == 0.0 and result["response_format"] == "answer"
    start, end = RELAXED_WINDOW_TEMPERATURE["window_temperature"], RELAXED_WINDOW_TEMPERATURE["window_temperature_end"]
    history = result["window_selection_history"]
    assert [entry["window_temperature"] for entry in history] == pytest.approx([start, math.sqrt(start * end), end])
    for entry in history:
        assert set(entry["saliency_gradient_norm"]) == set(entry["window_weight_peak"]) == {"1", "2", "3", "4"}
        assert all(1 / 9 <= peak <= 1 for peak in entry["window_weight_peak"].values())
    assert 0 <= result["window_hit_rate"] <= 100
