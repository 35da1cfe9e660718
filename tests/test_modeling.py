"""The model core on the real `lare-tiny` checkpoint: config, latent loop, forward/generate, errors, loading."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

import lare_hf.modeling
from conftest import chat, make_image
from lare_hf import LaReConfig, LaReForConditionalGeneration, LaReModel
from lare_hf.modeling.refocus import select_windows


def batch_inputs(processor, questions: list[str], seeds: list[int]):
    texts = [
        processor.apply_chat_template(chat(make_image(seed), question), add_generation_prompt=True, tokenize=False)
        for question, seed in zip(questions, seeds)
    ]
    images = [make_image(seed) for seed in seeds]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def suppressed_argmax(model, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone()
    logits[..., model.generation_config.suppress_tokens] = float("-inf")
    return logits.argmax(-1)


# ----------------------------------------------------------------------------------------------------- config


def test_config_defaults_follow_the_paper():
    config = LaReConfig()
    assert config.model_type == "lare"
    assert config.num_latent_steps == 4
    assert (config.extractor_num_layers, config.extractor_num_heads) == (2, 12)
    assert config.window_size == 8 and config.patch_grid_size == 16 and config.image_seq_length == 256
    assert (config.sym_loss_weight, config.image_loss_weight, config.text_loss_weight) == (1.0, 0.9, 0.9)
    assert config.text_prefix_length == 32
    assert config.text_config.hidden_size == 1536  # Qwen2.5-1.5B, Extractor width 1536 (Appendix B)
    assert config.reconstructor_config["block_out_channels"] == [96, 192, 384, 512]  # Table 7
    assert config.image_tokenizer_config["latent_channels"] == 16  # KL-16


def test_config_round_trip_and_validation(tmp_path, tiny_checkpoint):
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert isinstance(config, LaReConfig)
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    first, second = config.to_dict(), again.to_dict()
    first.pop("_name_or_path"), second.pop("_name_or_path")
    assert first == second
    with pytest.raises(ValueError, match="window_size"):
        LaReConfig(window_size=32)
    with pytest.raises(ValueError, match="image_seq_length"):
        LaReConfig(image_seq_length=100)
    # "full" keeps CLIP's CLS token: one image token before the 16x16 grid; anything else does not fit the grid
    assert LaReConfig(vision_feature_select_strategy="full", image_seq_length=257).image_grid_offset == 1
    with pytest.raises(ValueError, match="does not fit the vision tower's 16x16 patch grid"):
        LaReConfig(vision_feature_select_strategy="default", image_seq_length=257)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='crop' is not supported"):
        LaReConfig(vision_feature_select_strategy="crop")
    with pytest.raises(ValueError, match="max_latent_steps"):
        LaReConfig(num_latent_steps=20, max_latent_steps=16)


def test_auto_classes_resolve_to_lare(tiny_checkpoint):
    assert type(AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)) is LaReForConditionalGeneration
    assert type(AutoModel.from_pretrained(tiny_checkpoint)) is LaReModel
    assert type(AutoProcessor.from_pretrained(tiny_checkpoint)).__name__ == "LaReProcessor"


# -------------------------------------------------------------------------------------------- latent loop


def test_forward_returns_latents_saliency_windows_and_loss(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    config = model.config
    inputs = batch_inputs(processor, ["which digit is in the red box?", "what is left of the circle?"], [0, 1])
    answers = torch.randint(10, 200, (2, 5))
    input_ids = torch.cat([inputs["input_ids"], answers], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(answers)], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -5:] = answers
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"], labels=labels)
    k, m, grid = config.num_latent_steps, config.latent_tokens_per_step, config.patch_grid_size
    assert out.logits.shape == (*input_ids.shape, config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert out.latent_embeds.shape == (2, k, m, config.text_config.hidden_size)
    assert out.saliency_maps.shape == (2, k, grid, grid)
    sums = out.saliency_maps.flatten(2).sum(-1)
    assert ((sums > 0) & (sums <= 1 + 1e-5)).all()  # part of the softmax mass that falls on image tokens
    assert out.window_positions.shape == (2, k, 2)
    assert ((out.window_positions >= 0) & (out.window_positions <= grid - config.window_size)).all()
    assert out.window_features.shape == (2, k, config.window_size**2, config.text_config.hidden_size)
    # latents are normalised to the scale of the token embeddings
    embed_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt()
    latent_rms = out.latent_embeds.pow(2).mean(-1).sqrt()
    assert torch.allclose(latent_rms, embed_rms.expand_as(latent_rms), rtol=0.05)


def test_saliency_matches_eager_attention(tiny_model_and_processor):
    """The registered attention function records exactly softmax(qK^T) of the last position on image tokens."""
    model, processor = tiny_model_and_processor
    inputs = batch_inputs(processor, ["a short one", "a much longer question about the boxes?"], [2, 3])
    out = model(**inputs)
    inner = model.model
    layout = inner.latent_layout(inputs["input_ids"])
    embeds, _, image_positions = inner.embed_multimodal(inputs["input_ids"], inputs["pixel_values"])
    prefix = layout.start + 1
    mask = inputs["attention_mask"][:, :prefix]
    lm = inner.language_model
    lm.config._attn_implementation = "eager"
    try:
        eager = lm(
            inputs_embeds=embeds[:, :prefix],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            output_attentions=True,
        )
    finally:
        lm.config._attn_implementation = "sdpa"
    last_rows = torch.stack([a[:, :, -1, :] for a in eager.attentions]).mean(dim=(0, 2))  # layers, heads
    expected = last_rows.gather(1, image_positions)
    torch.testing.assert_close(out.saliency_maps[:, 0].flatten(1), expected, atol=1e-5, rtol=1e-4)
    assert lm.config._attn_implementation == "sdpa"


def test_sliding_window_sum_pooling_picks_the_heaviest_window():
    saliency = torch.zeros(2, 64)
    saliency[0, 5 * 8 + 6] = 1.0  # row 5, col 6 -> best 4x4 window at stride 2 covering it
    saliency[1, :] = 0.01
    saliency[1, 0] = 0.5
    positions, indices = select_windows(saliency, grid_size=8, window_size=4, window_stride=2)
    assert positions[1].tolist() == [0, 0]
    row, col = positions[0].tolist()
    assert row <= 5 < row + 4 and col <= 6 < col + 4
    assert indices.shape == (2, 16) and (5 * 8 + 6) in indices[0].tolist()


def test_prefix_encoded_once_then_one_call_per_step(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = batch_inputs(processor, ["count the calls"], [4])
    lengths = []
    hook = model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    k, m = model.config.num_latent_steps, model.config.latent_tokens_per_step
    start = model.model.latent_layout(inputs["input_ids"]).start
    total = inputs["input_ids"].shape[1]
    # prefix through <|latent_start|>, then steps 1..K-1 (m positions each), then Z^(K) + <|latent_end|>.
    assert lengths == [start + 1] + [m] * (k - 1) + [total - (start + 1) - (k - 1) * m]


def test_gradients_reach_every_trainable_module_through_all_steps(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    model = LaReForConditionalGeneration(model.config)  # fresh copy so the shared fixture stays untouched
    model.train()
    inputs = batch_inputs(processor, ["gradients?", "through every step"], [5, 6])
    answers = torch.randint(10, 200, (2, 3))
    input_ids = torch.cat([inputs["input_ids"], answers], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -3:] = answers
    step_latents = []

    def keep(module, args, output):
        output[0].retain_grad()
        step_latents.append(output[0])

    hook = model.model.extractor.register_forward_hook(keep)
    out = model(
        input_ids=input_ids,
        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(answers)], 1),
        pixel_values=inputs["pixel_values"],
        labels=labels,
        compute_latent_losses=False,
    )
    hook.remove()
    out.loss.backward()
    for name in ("extractor", "multi_modal_projector", "language_model"):
        params = [(n, p) for n, p in model.model.named_parameters() if n.startswith(name)]
        assert params and all(p.grad is not None for _, p in params), name
    # every latent step influences the answer (gradients flow through all K steps)
    assert len(step_latents) == model.config.num_latent_steps
    for latents in step_latents:
        assert latents.grad is not None and (latents.grad.abs().flatten(1).sum(-1) > 0).all()


# ------------------------------------------------------------------------------------------------- generate


def test_batched_left_padded_generation_equals_single(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    questions = ["what digit?", "which container is on the left of the blue circle today?"]
    batch = batch_inputs(processor, questions, [7, 8])
    batched = model.generate(**batch, max_new_tokens=6, do_sample=False)
    new = batched[:, batch["input_ids"].shape[1] :]
    for index in range(2):
        single_inputs = batch_inputs(processor, [questions[index]], [7 + index])
        single = model.generate(**single_inputs, max_new_tokens=6, do_sample=False)
        assert single[0, single_inputs["input_ids"].shape[1] :].tolist() == new[index].tolist()


def test_greedy_generate_equals_forward_argmax(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = batch_inputs(processor, ["consistency check", "is forward the same as generate?"], [9, 10])
    prompt_length = inputs["input_ids"].shape[1]
    generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(generated[:, prompt_length:])], 1)
    out = model(input_ids=generated, attention_mask=attention_mask, pixel_values=inputs["pixel_values"])
    predicted = suppressed_argmax(model, out.logits[:, prompt_length - 1 : -1])
    assert predicted.tolist() == generated[:, prompt_length:].tolist()


def test_generate_modes_and_output_shape(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = batch_inputs(processor, ["modes"], [11])
    length = inputs["input_ids"].shape[1]
    greedy = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    assert greedy.shape == (1, length + 4)
    assert greedy[0, :length].tolist() == inputs["input_ids"][0].tolist()  # prompt + new tokens, as HF does
    torch.manual_seed(0)
    sampled_a = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True, num_return_sequences=3)
    torch.manual_seed(0)
    sampled_b = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert sampled_a.shape == (3, length + 4) and torch.equal(sampled_a, sampled_b)
    beams = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert beams.shape == (2, length + 4)
    best = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=3, output_scores=True)
    assert best.shape == (1, length + 4)


def test_num_latent_steps_rewrites_the_slots(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    config = model.config
    inputs = batch_inputs(processor, ["how many steps?"], [12])
    length = inputs["input_ids"].shape[1]
    m = config.latent_tokens_per_step
    for steps in (0, 2, config.num_latent_steps + 1):
        out = model.generate(**inputs, num_latent_steps=steps, max_new_tokens=3, min_new_tokens=3)
        # The README idiom `out[:, prompt_length:]` is the whole answer for every K: the caller's prompt comes back.
        assert out.shape == (1, length + 3) and torch.equal(out[:, :length], inputs["input_ids"])
        # ... and the answer is what K slots give: greedy tokens = argmax of one forward over the rewritten prompt.
        ids, mask = model.set_latent_steps(inputs["input_ids"], inputs["attention_mask"], steps)
        assert int((ids[0] == config.latent_token_id).sum()) == steps * m
        full = torch.cat([ids, out[:, length:]], dim=1)
        forward = model(input_ids=full, pixel_values=inputs["pixel_values"])
        assert (forward.latent_embeds is None) == (steps == 0)
        assert suppressed_argmax(model, forward.logits[:, -4:-1]).tolist() == out[:, -3:].tolist()
    ids, _ = model.set_latent_steps(inputs["input_ids"], inputs["attention_mask"], 0)
    for token in (config.latent_start_token_id, config.latent_token_id, config.latent_end_token_id):
        assert token not in ids[0].tolist()


# --------------------------------------------------------------------------------------------------- errors


def test_clear_errors_for_bad_input(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = batch_inputs(processor, ["errors", "more errors here"], [13, 14])
    with pytest.raises(ValueError, match="1 image\\(s\\) but 128 <\\|image\\|> tokens"):
        model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"][:1],
        )
    with pytest.raises(ValueError, match=r"pixel_values has images of \(32, 32\) pixels"):
        model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=torch.zeros(2, 3, 32, 32),
        )
    shifted = inputs["input_ids"].clone()
    shifted[1] = torch.roll(shifted[1], 1)
    with pytest.raises(ValueError, match="not aligned"):
        model(input_ids=shifted, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="max_latent_steps"):
        model.generate(**inputs, num_latent_steps=model.config.max_latent_steps + 1)
    plain = processor(
        text=[
            processor.apply_chat_template(
                chat(make_image(0), "no markers"), add_generation_prompt=True, tokenize=False, num_latent_steps=0
            )
        ],
        images=[make_image(0)],
        return_tensors="pt",
    )
    with pytest.raises(ValueError, match="no latent markers"):
        model.generate(**plain, num_latent_steps=4)
    with pytest.raises(ValueError, match="assisted / prompt-lookup"):
        model.generate(**inputs, prompt_lookup_num_tokens=2)
    too_many = processor(text=[processor.apply_chat_template(chat(make_image(0), "x"), add_generation_prompt=True, tokenize=False,
                                                             num_latent_steps=model.config.max_latent_steps + 1)],
                         images=[make_image(0)], return_tensors="pt")  # fmt: skip
    with pytest.raises(ValueError, match="at most max_latent_steps"):
        model(**too_many)


# --------------------------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_keeps_outputs(tmp_path, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_lare.py", "configuration_lare.py", "refocus.py"} <= files
    # every module the modeling code imports (relatively) travels with it as the checkpoint's custom code
    modeling = Path(lare_hf.modeling.__file__).parent
    imported = set(re.findall(r"^from \.(\w+) import", (modeling / "modeling_lare.py").read_text(), re.MULTILINE))
    assert {"latent_loop", "latent_losses", "latent_region", "generation", "outputs", "builders"} <= imported
    assert {f"{name}.py" for name in imported} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_lare.LaReForConditionalGeneration"
    assert auto_map["AutoModel"] == "modeling_lare.LaReModel"
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    inputs = batch_inputs(processor, ["round trip"], [15])
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    BLOCK = {block}
    if BLOCK:
        sys.modules["lare_hf"] = None  # lare_hf is not importable in this process
    else:
        import lare_hf
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = sys.argv[1]
    kwargs = {{"trust_remote_code": True}} if BLOCK else {{}}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
    ids = torch.load(sys.argv[2])
    out = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    print(type(model).__module__, out[0, -5:].tolist())
    """
)


@pytest.mark.parametrize("block", [False, True], ids=["lare_hf-imported", "trust_remote_code"])
def test_fresh_process_loads_checkpoint(tmp_path, tiny_checkpoint, tiny_model_and_processor, block):
    model, processor = tiny_model_and_processor
    inputs = dict(batch_inputs(processor, ["fresh process"], [16]))
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, -5:].tolist()
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS.format(block=block))
    result = subprocess.run(
        [sys.executable, str(script), tiny_checkpoint, str(tmp_path / "inputs.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, tokens = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert json.loads(tokens) == expected
    assert ("transformers_modules" in module) == block


def test_loading_custom_code_without_trust_raises(tiny_checkpoint, tmp_path):
    script = tmp_path / "no_trust.py"
    script.write_text(
        "import sys\nsys.modules['lare_hf'] = None\n"
        "from transformers import AutoModelForImageTextToText\n"
        "try:\n    AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
        "except ValueError as e:\n    print('refused', 'trust_remote_code' in str(e))\n"
    )
    result = subprocess.run(
        [sys.executable, str(script), tiny_checkpoint], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert "refused True" in result.stdout, result.stderr[-2000:]
