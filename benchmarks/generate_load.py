"""Varied `generate` calls and a snapshot of what a model keeps between calls (shared by
benchmarks/bench_generate_memory.py and tests/test_memory_under_load.py)."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import torch
from PIL import Image
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

QUESTIONS = ["Which digit is in the red square?", "What is left of the blue circle?", "Count the marks.", "Why?"]


def generate_once(model, processor, call: int) -> torch.Tensor:
    """Call `call` of a varied series: batch of 1-3, with and without images, K 0-4, image sizes, halting or not,
    greedy or sampled, 1-4 new tokens."""
    rng = np.random.default_rng(call)
    batch = []
    for row in range(1 + call % 3):
        size = int(rng.integers(8, 160))
        image = Image.fromarray(rng.integers(0, 256, (size, int(rng.integers(8, 160)), 3), dtype=np.uint8))
        text = QUESTIONS[(call + row) % len(QUESTIONS)] * (1 + call % 4)
        content = (
            [{"type": "text", "text": text}]
            if (call + row) % 5 == 4
            else [{"type": "image", "image": image}, {"type": "text", "text": text}]
        )
        batch.append([{"role": "user", "content": content}])
    inputs = processor.apply_chat_template(
        batch,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
        num_latent_steps=call % 5,
    )
    arguments = dict(max_new_tokens=1 + call % 4, do_sample=call % 2 == 1)
    with_image = any(part["type"] == "image" for messages in batch for part in messages[0]["content"])
    if call % 3 == 0 and call % 5 >= 2 and with_image:  # halting on text-only batches: see issue 27's report
        arguments.update(latent_halting=("cosine", "l1", "l2")[call % 9 // 3], latent_halting_threshold=0.5)
    with torch.no_grad():
        return model.generate(**inputs, **arguments)


def load_state(model) -> dict[str, int]:
    """What could accumulate across calls: hooks on every module (and torch's global ones), attributes and the
    sizes of container attributes of every module, transformers' attention registries, live tensors."""
    gc.collect()
    hooks = 0
    attributes = 0
    container_items = 0
    for module in model.modules():
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            hooks += len(getattr(module, name, {}))
        attributes += len(vars(module))
        container_items += sum(len(value) for value in vars(module).values() if isinstance(value, (dict, list, set)))
    global_hooks = sum(
        len(getattr(torch.nn.modules.module, name))
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )
    return {
        "module_hooks": hooks,
        "global_hooks": global_hooks,
        "module_attributes": attributes,
        "module_container_items": container_items,
        "attention_functions": len(ALL_ATTENTION_FUNCTIONS._global_mapping)
        + len(ALL_ATTENTION_FUNCTIONS._local_mapping),
        "mask_functions": len(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
        + len(ALL_MASK_ATTENTION_FUNCTIONS._local_mapping),
        "attn_implementation": hash(str(model.config.text_config._attn_implementation)),
        "live_tensors": live_tensors(),
    }


def live_tensors() -> int:
    with warnings.catch_warnings():  # touching every object trips deprecated module attributes' warnings
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))
