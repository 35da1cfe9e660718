"""Split serving (`lare_hf.serving`, `lare export-lm`): the latent phase in transformers, decoding by the exported
bare language model from input embeddings, as vLLM's `enable_prompt_embeds` would (checked here without vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import chat, make_image
from lare_hf.build import build_tiny
from lare_hf.cli import main
from lare_hf.serving import chat_prompt_embeds, language_model_of, pad_prompt_embeds

# A batch of image and text-only requests of different lengths (left padding in the batch).
REQUESTS = [
    chat(make_image(5), "Which digit?"),
    chat(None, "Say something long about the weather."),
    chat(make_image(7), "which container is on the left of the blue circle today?"),
    chat(None, "Hi"),
]
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("exported") / "lm"
    assert main(["export-lm", "--model", tiny_checkpoint, "--output", str(output)]) == 0
    return output


def test_export_lm_writes_a_plain_causal_lm_checkpoint(exported, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == model.config.text_config.model_type == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in config
    assert config["vocab_size"] == len(processor.tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert config["tie_word_embeddings"] is True  # tiny ties its head, as trained
    language_model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(language_model).__name__ == "Qwen2ForCausalLM"
    for name, tensor in model.model.language_model.state_dict().items():
        assert torch.equal(language_model.model.state_dict()[name], tensor), name
    assert torch.equal(language_model.lm_head.weight, model.lm_head.weight)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.convert_tokens_to_ids("<|latent_end|>") == model.config.latent_end_token_id
    # the image and latent tokens stay suppressed when the exported model decodes
    assert language_model.generation_config.suppress_tokens == model.generation_config.suppress_tokens


def test_export_keeps_an_untied_head_untied():
    model, _ = build_tiny(overrides={"tie_word_embeddings": False}, seed=0)
    language_model = language_model_of(model)
    assert language_model.config.tie_word_embeddings is False
    assert torch.equal(language_model.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(language_model.lm_head.weight, language_model.get_input_embeddings().weight)


def test_export_lm_refuses_to_overwrite(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert main(["export-lm", "--model", tiny_checkpoint, "--output", str(output)]) == 2
    assert "is not empty; nothing was written" in capsys.readouterr().err
    assert [path.name for path in output.iterdir()] == ["notes.txt"]
    assert main(["export-lm", "--model", tiny_checkpoint, "--output", tiny_checkpoint, "--overwrite"]) == 2
    assert "is the LaRe checkpoint itself" in capsys.readouterr().err
    assert main(["export-lm", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "num_latent_steps, halting",
    [(0, None), (2, None), (4, None), (6, ("l2", 0.012)), (4, ("l1", 1e6))],
    ids=["k0", "k2", "k4", "k6-l2-halting", "k4-all-halt-at-2"],
)
def test_exported_lm_from_latent_phase_embeds_answers_as_generate(
    exported, tiny_model_and_processor, num_latent_steps, halting
):
    model, processor = tiny_model_and_processor
    halting_kwargs = dict(zip(("latent_halting", "latent_halting_threshold"), halting or (None, None)))
    inputs = processor.apply_chat_template(
        REQUESTS, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True},
    )  # fmt: skip
    expected = model.generate(
        **inputs, num_latent_steps=num_latent_steps, return_dict_in_generate=True, **halting_kwargs, **GREEDY
    )
    answers = expected.sequences[:, inputs["input_ids"].shape[1] :].tolist()

    sequences = chat_prompt_embeds(model, processor, REQUESTS, num_latent_steps=num_latent_steps, **halting_kwargs)
    image_tokens = model.config.image_seq_length
    m = model.config.latent_tokens_per_step
    text_lengths = [int(length) for length in inputs["attention_mask"].sum(dim=1)]
    steps = expected.latent_steps.tolist() if halting else [num_latent_steps, 0, num_latent_steps, 0]
    if halting == ("l1", 1e6):
        assert steps == [2, 0, 2, 0]
    elif halting:
        assert steps[0] != steps[2]  # the two image requests stop at their own step
    for row, sequence in enumerate(sequences):
        # the processor rendered the default K=4; each row holds its own K*m latents (unused slots dropped)
        rendered = 4 * m + 2 if row in (0, 2) else 0
        region = steps[row] * m + 2 if row in (0, 2) and steps[row] else 0
        assert sequence.shape == (text_lengths[row] - rendered + region, model.config.text_config.hidden_size)
        if row in (0, 2):
            assert text_lengths[row] > image_tokens

    language_model = AutoModelForCausalLM.from_pretrained(exported).eval()
    inputs_embeds, attention_mask = pad_prompt_embeds(sequences)
    batched = language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **GREEDY)
    assert batched.tolist() == answers
    alone = [language_model.generate(inputs_embeds=sequence[None], **GREEDY)[0].tolist() for sequence in sequences]
    assert alone == answers


def test_generate_takes_a_tokenizer_for_stop_strings(tiny_model_and_processor):
    """`transformers serve` always passes `tokenizer=` to generate(), which hands it on to forward()."""
    model, processor = tiny_model_and_processor
    inputs = processor.apply_chat_template(
        chat(make_image(5), "Which digit?"), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    length = inputs["input_ids"].shape[1]
    full = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, length:].tolist()
    text = processor.decode(full, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = model.generate(
        **inputs, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=processor.tokenizer
    )[0, length:].tolist()
    assert len(stopped) < len(full) and stopped == full[: len(stopped)]
    assert stop in processor.decode(stopped, skip_special_tokens=True)
