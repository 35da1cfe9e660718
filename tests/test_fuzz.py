"""Property-based tests (hypothesis): the processor and `generate` on generated chat messages, images and generation
arguments either return a well-formed output or raise one of the documented exception types (ValueError, TypeError)
with a message naming what was wrong; no other exception, no hang, no NaN.

Bounded for CI (a few hundred examples, well under a minute). For a long local run:
    LARE_FUZZ_EXAMPLES=2000 python -m pytest -q -p no:cacheprovider tests/test_fuzz.py
(the processor test runs that many examples, `generate` a quarter of them; the counts are printed)."""

from __future__ import annotations

import os
import signal
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

EXAMPLES = int(os.environ.get("LARE_FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = dict(
    deadline=None,  # a hang is caught by `time_limit` (a slow first call is not a failure)
    derandomize=EXAMPLES <= 300,  # CI: the same examples every run; long local runs explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    database=None,
)
SECONDS_PER_EXAMPLE = 60
# Our documented exception types for bad input (cli.USER_ERRORS less the file system ones, plus TypeError for a
# keyword that does not exist).
DOCUMENTED = (ValueError, TypeError)
# Every error message names what it is about: one of the arguments or message parts a caller passes.
ARGUMENT_WORDS = ("message", "content", "role", "image", "text", "prompt", "num_latent_steps", "max_new_tokens",
                  "latent_halting", "pixel_values", "tokens", "input_ids", "K=")  # fmt: skip
SPECIAL_TOKENS = ["<|image|>", "<|latent|>", "<|latent_start|>", "<|latent_end|>", "<|im_start|>", "<|im_end|>",
                  "<|endoftext|>", "{{", "{%", "\x00", "\u202e", "🙂", "\n\n"]  # fmt: skip
OUTCOMES: dict[str, Counter] = {"processor": Counter(), "generate": Counter()}


@contextmanager
def time_limit(seconds: int):
    """Fail an example that runs longer than `seconds` (a hang) instead of blocking the suite."""

    def expire(signum, frame):
        raise TimeoutError(f"example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- strategies
texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=8)), max_size=6).map("".join),
    st.sampled_from(["", " ", "\n"]),
)
huge_texts = st.integers(2_000, 20_000).map(lambda n: "refocus " * n)


@st.composite
def images(draw):
    width, height = draw(st.integers(1, 4096)), draw(st.integers(1, 64))
    if draw(st.booleans()):
        width, height = height, width
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["pil", "numpy", "torch"]))
    if kind == "pil":
        mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK", "YCbCr", "HSV"]))
        base = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if mode == "I;16":
            return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        try:
            return base.convert(mode)
        except ValueError:
            return Image.new(mode, (width, height))
    dtype = draw(st.sampled_from(["uint8", "uint16", "float32", "float64", "bool", "int64"]))
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    shape = (height, width) if channels is None else (height, width, channels)
    if dtype.startswith("float"):
        array = rng.random(shape).astype(dtype)
        if draw(st.integers(0, 9)) == 0:
            array.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e9]))
    elif dtype == "bool":
        array = rng.random(shape) > 0.5
    else:  # mostly 8-bit values, sometimes the dtype's whole range
        high = np.iinfo(dtype).max if dtype == "uint16" or draw(st.integers(0, 4)) == 0 else 255
        array = rng.integers(0, high, shape, dtype=dtype, endpoint=True)
    if kind == "torch":
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor
    return array


def image_part(draw_image):
    return st.builds(lambda image: {"type": "image", "image": image}, draw_image)


bad_parts = st.sampled_from(
    [{"type": "video"}, {"type": "text"}, {"type": "text", "text": 5}, {"type": "image"}, {"type": "image", "image": 3},
     {"text": "no type"}, "a bare string", None]
)  # fmt: skip
parts = st.one_of(
    st.builds(lambda text: {"type": "text", "text": text}, texts),
    image_part(images()),
    bad_parts,
)
messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "user", "assistant", "system", "robot", ""]),
        "content": st.one_of(texts, st.lists(parts, max_size=4), st.integers(), st.none()),
    }
)
user_turns = st.fixed_dictionaries(
    {"role": st.just("user"), "content": st.one_of(texts, st.lists(parts, min_size=1, max_size=3))}
)
conversations = st.one_of(
    st.lists(user_turns, min_size=1, max_size=2),  # mostly well-formed turns, to get past the structure checks
    st.lists(user_turns, min_size=1, max_size=2),
    st.lists(messages, max_size=3),
    st.just("not a list"),
)


def check_error(error: BaseException, outcome: Counter) -> None:
    """A documented exception type with a message that names what it is about."""
    if not isinstance(error, DOCUMENTED):
        raise AssertionError(f"undocumented exception {type(error).__name__}: {error}") from error
    message = str(error)
    assert any(word in message for word in ARGUMENT_WORDS), f"{type(error).__name__} names no argument: {message}"
    outcome[f"{type(error).__name__}: {message[:60]}"] += 1


def check_processor_output(inputs, num_images: int) -> None:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.dtype == torch.long and ids.dim() == 2 and mask.shape == ids.shape
    if num_images:
        pixels = inputs["pixel_values"]
        assert pixels.shape[0] == num_images and pixels.shape[1] == 3
        assert torch.isfinite(pixels).all(), "NaN or inf in pixel_values"


def count_images(conversation) -> int:
    return sum(
        1
        for message in conversation
        for part in (message["content"] if isinstance(message["content"], list) else [])
        if isinstance(part, dict) and part.get("type") == "image"
    )


@settings(max_examples=EXAMPLES, **FUZZ_SETTINGS)
@given(conversation=conversations, num_latent_steps=st.one_of(st.none(), st.integers(-2, 20)), huge=st.booleans())
def test_processor_on_generated_messages(tiny_model_and_processor, conversation, num_latent_steps, huge):
    _, processor = tiny_model_and_processor
    if huge and isinstance(conversation, list) and conversation:  # one huge text part (a pasted document)
        conversation = [*conversation[:-1], {"role": "user", "content": "refocus " * 5000}]
    kwargs = {} if num_latent_steps is None else {"num_latent_steps": num_latent_steps}
    outcome = OUTCOMES["processor"]
    with time_limit(SECONDS_PER_EXAMPLE):
        try:
            inputs = processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                **kwargs,
            )  # fmt: skip
        except Exception as error:
            check_error(error, outcome)
            return
    check_processor_output(inputs, count_images(conversation))
    outcome["ok"] += 1


good_images = images()
generation_arguments = st.fixed_dictionaries(
    {},
    optional={
        "num_latent_steps": st.one_of(st.integers(-1, 17), st.floats(-1, 3), st.booleans()),
        "max_new_tokens": st.one_of(st.integers(-1, 6), st.floats(0, 3)),
        "latent_halting": st.sampled_from(["cosine", "l1", "l2", "euclid", None]),
        "latent_halting_threshold": st.one_of(st.floats(allow_nan=True), st.floats(0, 1), st.none()),
        "do_sample": st.booleans(),
        "temperature": st.floats(0.01, 3),
    },
)


@settings(max_examples=max(EXAMPLES // 4, 30), **FUZZ_SETTINGS)
@given(
    questions=st.lists(st.one_of(texts, st.text(min_size=1, max_size=200)), min_size=1, max_size=3),
    pictures=st.lists(st.one_of(good_images, st.none()), min_size=3, max_size=3),
    prompt_steps=st.integers(0, 6),
    generation=generation_arguments,
)
def test_generate_on_generated_inputs(tiny_model_and_processor, questions, pictures, prompt_steps, generation):
    model, processor = tiny_model_and_processor
    batch = []
    for question, picture in zip(questions, pictures):
        content = ([] if picture is None else [{"type": "image", "image": picture}]) + [
            {"type": "text", "text": question}
        ]
        batch.append([{"role": "user", "content": content}])
    outcome = OUTCOMES["generate"]
    with time_limit(SECONDS_PER_EXAMPLE):
        try:
            inputs = processor.apply_chat_template(
                batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                processor_kwargs={"padding": True}, num_latent_steps=prompt_steps,
            )  # fmt: skip
        except Exception as error:
            check_error(error, outcome)
            return
        generation = {"max_new_tokens": 3, **generation}
        try:
            with torch.no_grad():
                output = model.generate(**inputs, **generation, output_logits=True, return_dict_in_generate=True)
        except Exception as error:
            check_error(error, outcome)
            return
    sequences = output.sequences
    assert sequences.dtype == torch.long and sequences.shape[0] == len(batch)
    assert ((sequences >= 0) & (sequences < model.config.text_config.vocab_size)).all()
    new_tokens = sequences.shape[1] - inputs["input_ids"].shape[1]
    assert 0 <= new_tokens <= int(generation["max_new_tokens"])
    for logits in output.logits or ():
        assert torch.isfinite(logits).all(), "NaN or inf in the logits"
    outcome["ok"] += 1


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    """Print how many examples ended how (seen with `-s`; the long local run reports these figures)."""
    yield
    for name, outcome in OUTCOMES.items():
        print(f"\n[fuzz] {name}: {sum(outcome.values())} examples")
        for what, count in outcome.most_common(12):
            print(f"    {count:5d}  {what}")
