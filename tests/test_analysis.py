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
    assert len(set(steps)) > 1 and min(steps) >= 2 and max(steps) <= 6  # samples of one batch stop at their own step
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
        if steps[row] < 6:  # the comparison can fail: all six steps give other logits
            full = model.generate(**single, **GREEDY)
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
