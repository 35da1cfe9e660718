"""Mixed precision training (issue 9, item 3): every loss term finite in float16 and bfloat16 with a real-sized
vocabulary (49,152 words, SmolLM2's; >= 32k)."""

from __future__ import annotations

import pytest
import torch

from conftest import chat, make_image
from lare_hf.build import build_tiny
from lare_hf.training.trainer import LOSS_COMPONENTS

REAL_VOCABULARY = 49152


@pytest.fixture(scope="module")
def real_vocabulary_model():
    model, processor = build_tiny()
    model.resize_token_embeddings(REAL_VOCABULARY)
    assert model.config.text_config.vocab_size == REAL_VOCABULARY
    return model, processor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_step_in_half_precision_gives_finite_losses_and_gradients(real_vocabulary_model, dtype):
    model, processor = real_vocabulary_model
    model = model.to(dtype).train()
    try:
        batch = processor.build_training_inputs(
            [chat(make_image(index), f"Which digit is in the square? {index}") for index in range(2)],
            ["7", "three"],
            rationales=["The square at the top left holds a seven.", "Count the dots: three of them."],
            num_latent_steps=2,
        )
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        model.config.window_loss_weight = 1.0  # every loss component, the window-grounding one included
        batch["window_targets"] = torch.tensor([[0, 3], [5, -100]])
        outputs = model(**batch, compute_latent_losses=True)
        assert outputs.logits.shape[-1] == REAL_VOCABULARY and outputs.logits.dtype == dtype
        for name in (*LOSS_COMPONENTS, "loss"):
            value = getattr(outputs, name)
            assert value is not None and torch.isfinite(value), (name, value)
        outputs.loss.backward()
        gradients = [param.grad for param in model.parameters() if param.grad is not None]
        assert gradients and all(torch.isfinite(gradient).all() for gradient in gradients)
    finally:
        model.config.window_loss_weight = 0.0
        model.zero_grad(set_to_none=True)
        model.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_text_prefix_loss_of_half_precision_logits_over_a_real_vocabulary_is_finite(dtype):
    """Logits of a trained LM share an offset of a few units; summed over 49k words they exceed float16's range
    (65504), which must not turn L_text into NaN (inf * 0)."""
    from lare_hf.modeling.losses import text_prefix_loss

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 32, REAL_VOCABULARY, generator=generator) * 3 + 4).to(dtype).requires_grad_()
    assert not torch.isfinite(logits.sum()) or dtype == torch.bfloat16
    targets = torch.randint(0, REAL_VOCABULARY, (2, 32), generator=generator)
    mask = torch.ones_like(targets)
    mask[1, 20:] = 0
    loss = text_prefix_loss(logits, targets, mask)
    assert torch.isfinite(loss)
    expected = torch.nn.functional.cross_entropy(logits.float()[mask.bool()], targets[mask.bool()])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
