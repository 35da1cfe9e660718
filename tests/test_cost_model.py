"""benchmarks/cost_model.py against a hand count on the tiny preset (issue 29, item 1)."""

from __future__ import annotations

import sys
from pathlib import Path

from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cost_model import fake_model, generation, measure, preset_config, prompt_ids  # noqa: E402


def lm_token_flops(text_config, context: int) -> int:
    """Hand count of one token through the decoder at `context` keys: 2*in*out per linear layer (q, k, v, o, gate,
    up, down), and 2*d per key for q.k and again for the weighted sum of the values, per head."""
    hidden, inter = text_config.hidden_size, text_config.intermediate_size
    kv = text_config.num_key_value_heads * hidden // text_config.num_attention_heads
    linear = 2 * hidden * hidden * 2 + 2 * hidden * kv * 2 + 2 * hidden * inter * 3
    attention = 2 * 2 * hidden * context
    return text_config.num_hidden_layers * (linear + attention)


def test_decoding_and_head_flops_match_a_hand_count():
    config = preset_config("lare-tiny", num_latent_steps=0)
    model = fake_model(config, FakeTensorMode(allow_non_fake_inputs=True))
    inputs = prompt_ids(config, batch=1, with_answer=False)
    prompt = inputs["input_ids"].shape[1]
    new_tokens = 3
    flops, total = measure(model, generation(model, inputs, new_tokens))
    text = config.text_config
    assert flops["decoding"] == sum(lm_token_flops(text, prompt + step + 1) for step in range(new_tokens))
    # prefill: every prompt token, causal attention counted in full (prompt keys per query), as FlopCounterMode does
    prefill_linear = lm_token_flops(text, 0) * prompt
    assert flops["LM prefill"] == prefill_linear + text.num_hidden_layers * 4 * text.hidden_size * prompt * prompt
    # lm_head: 2 * hidden * vocab per scored position (the last prompt position, then each new token)
    assert flops["heads"] == 2 * text.hidden_size * text.vocab_size * (1 + new_tokens)
    assert sum(flops.values()) == total
