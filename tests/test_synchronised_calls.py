"""The phantom image row of sharded training (issue 24, `modeling/synchronised_calls.py`), on one process.

Under FSDP2 / ZeRO-3 a rank whose batch is text-only while other ranks hold images gets a phantom image row, so that
it calls the vision tower, the language model K+1 times, the Extractor and the loss heads as the others do. Here the
phantom path is forced on one unsharded process (the method that decides it is replaced on the instance): the text
rows' losses, logits and gradients must be exactly those of the plain forward, and the phantom must have run the
modules (the Extractor and the U-Net get a gradient, of 0). The 2-process run is in `test_fsdp.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import chat
from lare_hf.modeling.synchronised_calls import add_phantom_image_row, agreed_latent_steps

LOSSES = ("loss", "lm_loss", "alignment_loss", "text_reconstruction_loss", "image_reconstruction_loss")


@pytest.fixture(scope="module")
def text_batch(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    return processor.build_training_inputs(
        [chat(None, "Which digit is in the square? 0"), chat(None, "Hi")],
        ["seven", "nine"],
        rationales=["The square holds a seven.", None],
    )


def train_model(tiny_model_and_processor):
    from lare_hf.training.trainer import StageIVReasoningTrainer

    model = copy.deepcopy(tiny_model_and_processor[0])
    StageIVReasoningTrainer.configure_model(model)
    return model.train()


@pytest.mark.parametrize("phantom_steps", [None, 0])
def test_phantom_row_leaves_the_text_rows_losses_logits_and_gradients_unchanged(
    tiny_model_and_processor, text_batch, phantom_steps
):
    """The phantom of the other ranks' K (and of K=0, as in stage I: image tokens only, one language-model pass)."""
    plain = train_model(tiny_model_and_processor)
    expected = plain(**text_batch, compute_latent_losses=phantom_steps is None)
    expected.loss.backward()

    model = train_model(tiny_model_and_processor)
    num_steps = model.config.num_latent_steps if phantom_steps is None else phantom_steps
    appended = []

    def phantom_for_test(batch, inputs_embeds, position_ids):
        appended.append(add_phantom_image_row(batch, model.config, num_steps, pad_token_id=0))
        return appended[-1]

    model.synchronise_module_calls = phantom_for_test
    extractor_calls = []
    vision_calls = []
    model.model.extractor.register_forward_hook(lambda *args: extractor_calls.append(1))
    model.model.vision_tower.register_forward_hook(lambda *args: vision_calls.append(1))
    outputs = model(**text_batch, compute_latent_losses=phantom_steps is None)
    outputs.loss.backward()

    assert len(appended) == 1 and len(extractor_calls) == num_steps  # the phantom ran the latent phase
    assert len(vision_calls) == 1
    for name in LOSSES if phantom_steps is None else ("loss", "lm_loss"):
        assert float(getattr(outputs, name).detach()) == pytest.approx(
            float(getattr(expected, name).detach()), abs=1e-6
        ), name
    assert outputs.logits.shape == expected.logits.shape
    torch.testing.assert_close(outputs.logits, expected.logits, atol=1e-5, rtol=0)
    reference = dict(plain.named_parameters())
    for name, parameter in model.named_parameters():
        if reference[name].grad is None:
            assert parameter.grad is None or not parameter.grad.any(), name
            continue
        torch.testing.assert_close(parameter.grad, reference[name].grad, atol=1e-6, rtol=0, msg=name)
    if phantom_steps is None:
        assert model.reconstructor.unet.conv_in.weight.grad is not None  # the U-Net ran on the phantom (weight 0)
        assert not model.reconstructor.unet.conv_in.weight.grad.any()


def test_phantom_row_layout(tiny_model_and_processor, text_batch):
    model, _ = tiny_model_and_processor
    config = model.config
    batch = dict(text_batch)
    phantom = add_phantom_image_row(batch, config, 2, pad_token_id=0)
    rows, length = batch["input_ids"].shape
    assert (phantom.batch, phantom.length) == tuple(text_batch["input_ids"].shape)
    assert rows == phantom.batch + 1 and batch["pixel_values"].shape[0] == 1
    assert (batch["labels"][-1] == -100).all() and not batch["rationale_attention_mask"][-1].any()
    layout = model.model.latent_layout(batch["input_ids"])
    assert layout.num_steps == 2 and layout.rows.tolist() == [False] * phantom.batch + [True]
    assert not batch["attention_mask"][: phantom.batch, phantom.length :].any()  # the text rows' right padding


def test_agreed_latent_steps_outside_a_process_group_is_the_local_value():
    assert agreed_latent_steps(3, torch.device("cpu")) == 3
    assert agreed_latent_steps(-1, torch.device("cpu")) == -1


def test_image_loss_noise_is_drawn_per_sample_so_halves_give_the_whole_batch(tiny_model_and_processor):
    """L_img's noise and timesteps are seeded per sample (`noise_seeds`): rows 0-1 and rows 2-3 of a batch, each in
    its own forward, average to the whole batch's L_img (as two ranks do); the next training draw differs."""
    from conftest import make_image

    _, processor = tiny_model_and_processor
    model = train_model(tiny_model_and_processor)
    prompts = [chat(make_image(seed), "Which digit is in the square? 0") for seed in range(4)]

    def image_loss(rows: slice, draw: int) -> float:
        model.image_loss_draws = draw
        batch = processor.build_training_inputs(prompts[rows], ["seven"] * len(prompts[rows]))
        with torch.no_grad():
            return float(model(**batch).image_reconstruction_loss)

    whole = image_loss(slice(0, 4), 0)
    halves = (image_loss(slice(0, 2), 0) + image_loss(slice(2, 4), 0)) / 2
    assert halves == pytest.approx(whole, abs=1e-6)
    assert model.image_loss_draws == 1  # training counts its draws
    assert image_loss(slice(0, 4), 1) != pytest.approx(whole, abs=1e-4)  # the next step draws new noise
