"""Stage III on mixed instruction data and text-only prompts (issue 9, items 5-6): samples without a rationale or
an image in a batch, latent losses over the samples that have what they need, text-only generation at the default K.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from conftest import chat, make_image
from lare_hf.build import build_tiny
from lare_hf.data.collator import LaReDataCollator
from lare_hf.data.formats import load_records
from lare_hf.training.run import run_stage
from lare_hf.training.trainer import STAGE_TRAINERS
from test_training import stage_args, weights

IMAGE_QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is here?"}]}]
TEXT_QUESTION = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
MULTI_TURN = [
    {"role": "user", "content": [{"type": "text", "text": "Count to two."}]},
    {"role": "assistant", "content": "One, two."},
    {"role": "user", "content": [{"type": "text", "text": "And to three?"}]},
]
RATIONALE = "The digit sits in the top left box. It is a {}."
SINGLE_LOSSES = ("image_reconstruction_loss", "text_reconstruction_loss")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = build_tiny()
    return model.eval(), processor


def mixed_batch(processor, rows: list[int] | None = None):
    """Five samples: image + rationale, text-only, image + rationale, image without rationale, multi-turn text-only
    with a rationale (no image, so no latents for it to align with)."""
    samples = [
        (IMAGE_QUESTION, "3", make_image(1), RATIONALE.format(3)),
        (TEXT_QUESTION, "Hi.", None, None),
        (IMAGE_QUESTION, "5", make_image(2), RATIONALE.format(5)),
        (IMAGE_QUESTION, "7", make_image(3), None),
        (MULTI_TURN, "One, two, three.", None, "Add one more number."),
    ]
    samples = [samples[row] for row in rows] if rows is not None else samples
    prompts, answers, images, rationales = (list(column) for column in zip(*samples))
    return processor.build_training_inputs(prompts, answers, images=images, rationales=rationales)


def test_build_training_inputs_accepts_samples_without_rationale_or_image(tiny):
    _, processor = tiny
    batch = mixed_batch(processor)
    ids = batch["input_ids"]
    has_region = (ids == processor.latent_start_token_id).any(dim=1)
    has_image = (ids == processor.image_token_id).any(dim=1)
    assert has_region.tolist() == has_image.tolist() == [True, False, True, True, False]
    assert batch["pixel_values"].shape[0] == 3
    assert (batch["rationale_attention_mask"].sum(dim=1) > 0).tolist() == [True, False, True, False, True]
    # every answer starts at the same column; text-only prompts are plain prompts left-padded with the others
    answer_start = (batch["labels"] != -100).int().argmax(dim=1)
    assert (answer_start == answer_start[0]).all()
    start = int(answer_start[0])
    text_prompt = ids[1, :start][batch["attention_mask"][1, :start].bool()]
    assert processor.decode(text_prompt).endswith("Say hi.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="Rationale 0 is '  '; give a non-empty string, or None"):
        processor.build_training_inputs([TEXT_QUESTION], ["x"], rationales=["  "])


def test_collator_batches_llava_shaped_records(tiny, llava_file):
    _, processor = tiny
    records = load_records(llava_file)
    assert records.kind == "conversation" and len(records.without_image) == 4 and len(records.without_rationale) == 5
    features = [records[index] for index in range(len(records))]
    batch = LaReDataCollator(processor=processor)(features)
    assert batch["pixel_values"].shape[0] == len(records) - 4
    assert (batch["rationale_attention_mask"].sum(dim=1) > 0).sum() == len(records) - 5
    with_image = [feature["image"] is not None for feature in features]
    assert (batch["input_ids"] == processor.latent_start_token_id).any(dim=1).tolist() == with_image


def test_mixed_batch_losses_equal_their_valid_rows_alone(tiny):
    model, processor = tiny
    torch.manual_seed(0)
    mixed = model(**mixed_batch(processor), compute_latent_losses=True)
    assert mixed.latent_rows.tolist() == [True, False, True, True, False]
    for name in ("loss", "lm_loss", "alignment_loss", "alignment_text_loss", "alignment_visual_loss", *SINGLE_LOSSES):
        value = getattr(mixed, name)
        assert value is not None and torch.isfinite(value) and value > 0, name
    # L_img and L_sym's visual part: the rows with an image; L_text and L_sym's text part: those with a rationale too
    torch.manual_seed(0)
    image_rows = model(**mixed_batch(processor, [0, 2, 3]), compute_latent_losses=True)
    text_rows = model(**mixed_batch(processor, [0, 2]), compute_latent_losses=True)
    torch.testing.assert_close(mixed.alignment_visual_loss, image_rows.alignment_visual_loss)
    torch.testing.assert_close(mixed.image_reconstruction_loss, image_rows.image_reconstruction_loss)
    torch.testing.assert_close(mixed.alignment_text_loss, text_rows.alignment_text_loss)
    torch.testing.assert_close(mixed.text_reconstruction_loss, text_rows.text_reconstruction_loss)
    torch.testing.assert_close(mixed.latent_embeds[[0, 2, 3]], image_rows.latent_embeds)
    torch.testing.assert_close(mixed.window_positions[[0, 2, 3]], image_rows.window_positions)
    assert (mixed.saliency_maps[[1, 4]] == 0).all()


def test_batches_without_what_a_latent_loss_needs_train_on_the_rest(tiny):
    model, processor = tiny
    text_only = model(**mixed_batch(processor, [1, 4]), compute_latent_losses=True)
    assert text_only.latent_rows is None and text_only.latent_embeds is None
    for name in ("alignment_loss", "alignment_text_loss", "alignment_visual_loss", *SINGLE_LOSSES):
        value = getattr(text_only, name)
        assert value is not None and value.item() == 0 and value.requires_grad, name
    torch.testing.assert_close(text_only.loss, text_only.lm_loss)
    text_only.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    # images without rationales: the visual terms train, the text terms are 0
    no_rationale = model(**mixed_batch(processor, [3, 1]), compute_latent_losses=True)
    assert no_rationale.alignment_text_loss.item() == 0 and no_rationale.text_reconstruction_loss.item() == 0
    assert no_rationale.image_reconstruction_loss > 0
    # one valid row: the batch-of-one behaviour of L_sym, on that row alone
    one = model(**mixed_batch(processor, [0, 1]), compute_latent_losses=True)
    alone = model(**mixed_batch(processor, [0]), compute_latent_losses=True)
    torch.testing.assert_close(one.alignment_loss, alone.alignment_loss)
    torch.testing.assert_close(one.text_reconstruction_loss, alone.text_reconstruction_loss)
    model.zero_grad()


def test_text_only_batch_backpropagates_when_only_the_latent_modules_train(tiny):
    """Stage II freezes the language model: a batch without an image still gives a loss to backpropagate, and the
    Extractor sees (zero) gradients, as every other step, which DDP needs."""
    model, processor = tiny
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    STAGE_TRAINERS[2].configure_model(model)
    try:
        out = model(**mixed_batch(processor, [1, 4]), compute_latent_losses=True)
        out.loss.backward()
        grads = [parameter.grad for parameter in model.model.extractor.parameters()]
        assert all(grad is not None and not grad.any() for grad in grads)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
        model.zero_grad()


def generate(
    model, processor, messages: list, num_latent_steps: int | None = None, max_new_tokens: int = 6
) -> list[list[int]]:
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in messages]
    images = [part["image"] for chat in messages for part in chat[0]["content"] if part["type"] == "image"]
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_latent_steps=num_latent_steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def test_text_only_generation_at_the_default_k_is_the_k0_answer(tiny):
    model, processor = tiny
    text_chat = chat(None, "Tell me about boxes.")
    default = generate(model, processor, [text_chat])
    assert default == generate(model, processor, [text_chat], num_latent_steps=0)
    assert default == generate(model, processor, [text_chat], num_latent_steps=3)
    # a text-only prompt that carries a latent region anyway: generate() removes it; forward() without pixel_values
    # reads it as text (as LLaVA reads its image token); in a batch with an image it says why it cannot run it
    text = processor.apply_chat_template(text_chat, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text + processor.latent_placeholder], return_tensors="pt")
    assert processor.latent_token_id in inputs["input_ids"]
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out[:, inputs["input_ids"].shape[1] :].tolist() == default
    with torch.no_grad():
        assert model(**inputs).latent_embeds is None
    image_text = processor.apply_chat_template(
        chat(make_image(1), "Which digit?"), add_generation_prompt=True, tokenize=False
    )
    batch = processor(
        text=[image_text, text + processor.latent_placeholder],
        images=[make_image(1)],
        padding=True,
        return_tensors="pt",
    )
    with pytest.raises(ValueError, match=r"Rows \[1\] have a latent region but no image"):
        model(**batch)


def test_mixed_batch_generation_equals_each_row_alone(tiny):
    model, processor = tiny
    rows = [chat(make_image(5), "Which digit?"), chat(None, "Say something long about the weather."), chat(None, "Hi")]
    batched = generate(model, processor, rows)
    assert batched == [generate(model, processor, [row])[0] for row in rows]
    assert batched[1] == generate(model, processor, [rows[1]], num_latent_steps=0)[0]
    # another K for the batch: the image rows change K, the text-only rows stay K=0
    batched_k1 = generate(model, processor, rows, num_latent_steps=1)
    assert batched_k1 == [generate(model, processor, [row], num_latent_steps=1)[0] for row in rows]
    assert batched_k1[1:] == batched[1:]


def test_pipeline_answers_a_text_only_chat(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    result = pipe(text=messages, max_new_tokens=5, generate_kwargs={"do_sample": False}, return_full_text=False)
    expected = generate(model, processor, [messages], num_latent_steps=0, max_new_tokens=5)[0]
    assert result[0]["generated_text"] == processor.decode(expected, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- stage III recipe


@pytest.fixture(scope="module")
def llava_file(tmp_path_factory) -> str:
    """A LLaVA-665K-shaped JSON list: image conversations (one with a rationale), text-only conversations,
    multi-turn conversations with and without an image."""
    root = tmp_path_factory.mktemp("llava")
    (root / "coco").mkdir()
    for index in range(3):
        make_image(200 + index).save(root / "coco" / f"{index}.jpg")
    records = [
        {"id": "img-0", "image": "coco/0.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                           {"from": "gpt", "value": "Coloured noise."}]},
        {"id": "txt-0", "conversations": [{"from": "human", "value": "Name a colour."},
                                          {"from": "gpt", "value": "Blue."}]},
        {"id": "img-multi", "image": "coco/1.jpg",
         "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Dots."},
                           {"from": "human", "value": "Which colour dominates?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "txt-multi", "conversations": [{"from": "human", "value": "Count to two."},
                                              {"from": "gpt", "value": "One, two."},
                                              {"from": "human", "value": "And three?"},
                                              {"from": "gpt", "value": "One, two, three."}]},
        {"id": "reason-0", "image": "coco/2.jpg", "rationale": "The top left box holds a 4.",
         "conversations": [{"from": "human", "value": "<image>\nWhich digit is in the top left box?"},
                           {"from": "gpt", "value": "4"}]},
        {"id": "txt-1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {"id": "txt-2", "rationale": "Two plus two is four.",
         "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
    ]  # fmt: skip
    path = root / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_stage3_recipe_runs_on_llava_shaped_data(tiny_checkpoint, llava_file, tmp_path):
    output = tmp_path / "stage3"
    record = run_stage(*stage_args(3, tiny_checkpoint, llava_file, output, "--per_device_train_batch_size", "4"))
    assert record["global_steps"] == 2 and record["num_examples"] == 7
    logged = record["last_logged_losses"]
    for name in ("lm_loss", "alignment_loss", "image_reconstruction_loss", "text_reconstruction_loss"):
        assert name in logged and logged[name] >= 0, name
    before, after = weights(tiny_checkpoint), weights(output)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any(name.startswith("model.extractor.") for name in changed)
    assert any(name.startswith("model.language_model.") for name in changed)
    assert Path(output, "config.json").is_file()


def test_adaptive_halting_leaves_text_only_rows_alone(tiny):
    """A text-only row has prompt tokens where image rows have latent slots: halting never masks them."""
    model, processor = tiny
    rows = [chat(make_image(5), "Which digit?"), chat(None, "Say something long about the weather.")]
    texts = [processor.apply_chat_template(row, add_generation_prompt=True, tokenize=False) for row in rows]
    inputs = processor(text=texts, images=[make_image(5)], padding=True, return_tensors="pt")
    halted = model.generate(
        **inputs,
        num_latent_steps=4,
        latent_halting="l1",
        latent_halting_threshold=1e6,  # every image row stops after step 2
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert halted.latent_steps.tolist() == [2, 0]
    answers = halted.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    assert answers[0] == generate(model, processor, [rows[0]], num_latent_steps=2)[0]
    assert answers[1] == generate(model, processor, [rows[1]], num_latent_steps=0)[0]
