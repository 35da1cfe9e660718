"""Scale-ready training on the tiny preset: gradient checkpointing through the latent loop (issue 9)."""

from __future__ import annotations

import json
import unittest.mock
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.modeling_layers import GradientCheckpointingLayer

from conftest import chat, make_image
from lare_hf.build import build_tiny
from lare_hf.configs import packaged_configs_dir
from lare_hf.modeling.latent_losses import LaReLatentLossesMixin
from lare_hf.training.arguments import parse_train_arguments
from lare_hf.training.run import run_stage


@pytest.fixture(scope="module")
def tiny_training_model():
    model, processor = build_tiny()
    return model.train(), processor


def training_batch(processor, num_latent_steps: int, size: int = 3):
    return processor.build_training_inputs(
        [chat(make_image(index), f"Which shape is at the top? {index}") for index in range(size)],
        ["a red circle", "two", "the third answer is longer"][:size],
        rationales=["The top row holds a circle.", "Count them: two.", "Look at the top, then read it."][:size],
        num_latent_steps=num_latent_steps,
    )


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    for module in model.modules():  # the LaRe model, also inside PEFT's wrapper
        if isinstance(module, LaReLatentLossesMixin):
            module.image_loss_draws = 0  # the same diffusion noise / timesteps for L_img in both runs (`noise_seeds`)
    outputs = model(**batch, compute_latent_losses=True)
    outputs.loss.backward()
    gradients = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return outputs.loss.detach(), gradients


def assert_same_gradients(reference: dict[str, torch.Tensor], checkpointed: dict[str, torch.Tensor]) -> None:
    assert checkpointed.keys() == reference.keys(), sorted(set(reference) ^ set(checkpointed))[:5]
    scale = max(gradient.abs().max() for gradient in reference.values())
    for name, gradient in reference.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize(
    "num_latent_steps", [1, 2, *(pytest.param(k, marks=pytest.mark.slow) for k in range(3, 8)), 8]
)
def test_gradient_checkpointing_through_the_latent_loop_changes_no_loss_or_gradient(
    tiny_training_model, num_latent_steps
):
    """K = 1..8: the checkpointed step gives the plain step's loss and every gradient (reentrant and not), and
    no parameter that gets a gradient without checkpointing loses it."""
    model, processor = tiny_training_model
    batch = training_batch(processor, num_latent_steps, size=2)
    reference_loss, reference = loss_and_gradients(model, batch)
    assert any(name.startswith("model.language_model.") for name in reference)
    for use_reentrant in (False, True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        try:
            assert model.model.language_model.layers[0].gradient_checkpointing
            loss, gradients = loss_and_gradients(model, batch)
        finally:
            model.gradient_checkpointing_disable()
        torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=0)
        assert_same_gradients(reference, gradients)


def test_gradient_checkpointing_with_lora(tiny_checkpoint):
    """PEFT LoRA on the language model, checkpointed (both reentrant settings): same loss and gradients, and the
    adapters of every layer get one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    model = get_peft_model(model, config).train()
    batch = training_batch(processor, num_latent_steps=3, size=2)
    reference_loss, reference = loss_and_gradients(model, batch)
    adapters = {name for name, param in model.named_parameters() if param.requires_grad}
    assert adapters == set(reference) and all("lora_" in name for name in adapters)
    for use_reentrant in (False, True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        loss, gradients = loss_and_gradients(model, batch)
        model.gradient_checkpointing_disable()
        torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=0)
        assert_same_gradients(reference, gradients)


@pytest.fixture(scope="module")
def reasoning_file(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("reasoning")
    with open(root / "train.jsonl", "w") as handle:
        for index in range(4):
            make_image(200 + index).save(root / f"{index}.png")
            record = {
                "image": f"{index}.png",
                "question": "Which digit is in the red square?",
                "rationale": f"The red square is at the top left. It holds the digit {index}.",
                "answer": str(index),
            }
            handle.write(json.dumps(record) + "\n")
    return str(root / "train.jsonl")


def train_two_steps(checkpoint: str, data: str, output: Path, *extra: str) -> dict[str, torch.Tensor]:
    overrides = ["--model_name_or_path", checkpoint, "--train_file", data, "--output_dir", str(output),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
                 "--latent_lr", "1e-2", "--optim", "sgd", "--save_steps", "1000", "--logging_steps", "1", *extra]  # fmt: skip
    run_stage(*parse_train_arguments(str(packaged_configs_dir() / "tiny" / "stage2.yaml"), overrides))
    return load_file(output / "model.safetensors")


def test_trainer_with_gradient_checkpointing_reaches_the_same_weights(tiny_checkpoint, reasoning_file, tmp_path):
    """`lare train --gradient_checkpointing True` on the stage-2 recipe (K=4), with both reentrant settings, trains
    to the weights of the run without checkpointing (plain SGD, so float noise in a gradient that is zero in exact
    arithmetic is not blown up to a full step as Adam would)."""
    reference = train_two_steps(tiny_checkpoint, reasoning_file, tmp_path / "plain")
    start = load_file(Path(tiny_checkpoint) / "model.safetensors")
    moved = [name for name in reference if not torch.equal(reference[name], start[name])]
    assert any(name.startswith("model.extractor.") for name in moved)
    for use_reentrant in ("false", "true"):
        trained = train_two_steps(
            tiny_checkpoint, reasoning_file, tmp_path / f"checkpointed-{use_reentrant}",
            "--gradient_checkpointing", "True",
            "--gradient_checkpointing_kwargs", f'{{"use_reentrant": {use_reentrant}}}',
        )  # fmt: skip
        for name in moved:
            torch.testing.assert_close(trained[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_checkpointing_a_layer_through_any_callable(tiny_training_model):
    """Layers without a KV cache (the vision tower's, the U-Net's) may hand the checkpoint function any callable,
    not only the decoder layers' `functools.partial`: it is checkpointed as it is (run again during backward), and
    the loss and gradients stay those of the plain step."""
    model, processor = tiny_training_model
    batch = training_batch(processor, 2, size=2)
    reference_loss, reference = loss_and_gradients(model, batch)
    layer = next(
        module for module in model.model.vision_tower.modules() if isinstance(module, GradientCheckpointingLayer)
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint_function = layer._gradient_checkpointing_func
    counter = unittest.mock.Mock()  # a call counter around the layer's forward (any attribute reads as a Mock)

    def checkpoint_a_counted_forward(function, *args):
        counter.side_effect = function
        return checkpoint_function(counter, *args)

    layer._gradient_checkpointing_func = checkpoint_a_counted_forward
    try:
        loss, gradients = loss_and_gradients(model, batch)
    finally:
        model.gradient_checkpointing_disable()
    assert counter.call_count == 2  # the forward and its replay during backward
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=0)
    assert_same_gradients(reference, gradients)
