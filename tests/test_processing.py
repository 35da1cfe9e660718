"""LaReProcessor and the offline tiny tokenizer: real objects, no mocks."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, CLIPImageProcessorPil, Qwen2Tokenizer

from lare_hf.modeling.configuration_lare import LARE_SPECIAL_TOKENS, LaReConfig
from lare_hf.processing import processing_lare, tokenization
from lare_hf.processing.processing_lare import LaReProcessor, build_processor, lare_chat_template
from lare_hf.processing.tokenization import add_lare_special_tokens, build_tiny_tokenizer

# sha256 of the sorted vocabulary of `build_tiny_tokenizer()`. Checkpoints depend on these ids: if the corpus or the
# trainer changes on purpose, update the hash (and rebuild saved tiny checkpoints).
TINY_VOCAB_SHA256 = "c8a5fcfdc25cb5f5b03ab6c196dff03c2d27693052076778749878452a9ee59c"

LATENT_GROUP = "<|latent_start|><|latent|><|latent_end|>"


def image(seed: int = 0, size: tuple[int, int] = (80, 100)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def processor():
    # K=4, m=2 -> 8 latent slots; 64 image tokens per image; 64x64 pixels.
    return build_processor(
        build_tiny_tokenizer(), image_size=64, image_seq_length=64, num_latent_steps=4, latent_tokens_per_step=2
    )


def user(text: str, with_image: bool = True) -> list[dict]:
    content = ([{"type": "image", "image": image()}] if with_image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_is_deterministic(tokenizer):
    other = build_tiny_tokenizer()
    assert other.get_vocab() == tokenizer.get_vocab()
    assert other.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    text = "<|im_start|>user\nWhich digit is in the red container, left or right? 42<|im_end|>"
    assert other.encode(text) == tokenizer.encode(text)
    # the same vocabulary in every process (PYTHONHASHSEED, Rust hash seeds do not matter)
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    assert digest == TINY_VOCAB_SHA256


def test_tiny_tokenizer_special_tokens(tokenizer):
    assert tokenization.LARE_SPECIAL_TOKENS == LARE_SPECIAL_TOKENS
    assert len(tokenizer) == 1024 and tokenizer.vocab_size == 1017
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *LARE_SPECIAL_TOKENS.values()]
    assert tokenizer.convert_tokens_to_ids(specials) == list(range(1017, 1024))
    for token in specials:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 1019
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 1017
    assert tokenizer.bos_token is None and tokenizer.padding_side == "left"
    assert (tokenizer.image_token, tokenizer.image_token_id) == ("<|image|>", 1020)
    assert (tokenizer.latent_start_token_id, tokenizer.latent_token_id, tokenizer.latent_end_token_id) == (
        1021,
        1022,
        1023,
    )
    assert set(specials) <= set(tokenizer.all_special_tokens)
    # corpus words are single tokens; digits are split one by one (as in Qwen2)
    assert len(tokenizer.encode(" triangle", add_special_tokens=False)) == 1
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("123", add_special_tokens=False)) == ["1", "2", "3"]
    # byte-level: any text round-trips; no special token is added implicitly
    text = "Größe 日本語 😀 \t\n x"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and max(ids) < 1017
    assert tokenizer.decode(tokenizer.encode(f"<|im_start|>hi{LATENT_GROUP}"), skip_special_tokens=True) == "hi"


def test_tiny_tokenizer_vocab_size_argument():
    small = build_tiny_tokenizer(vocab_size=512)
    assert len(small) == 512 and small.convert_tokens_to_ids("<|latent_end|>") == 511
    with pytest.raises(ValueError, match="at least 263"):
        build_tiny_tokenizer(vocab_size=100)


def test_tiny_tokenizer_save_and_autotokenizer_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.image_token_id, loaded.latent_token_id) == (1020, 1022)
    assert (loaded.eos_token, loaded.pad_token, loaded.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    assert add_lare_special_tokens(loaded) == add_lare_special_tokens(tokenizer)
    assert len(loaded) == 1024


def test_add_lare_special_tokens_to_a_pretrained_style_tokenizer(tmp_path):
    vocab_items, merges = tokenization._trained_bpe(400)
    vocab = dict(vocab_items)
    qwen = Qwen2Tokenizer(vocab=vocab, merges=list(merges))
    base_len = len(qwen)
    assert getattr(qwen, "image_token", None) is None
    ids = add_lare_special_tokens(qwen)
    assert list(ids) == ["image_token_id", "latent_start_token_id", "latent_token_id", "latent_end_token_id"]
    assert set(ids) <= set(inspect.signature(LaReConfig.__init__).parameters)
    assert sorted(ids.values()) == list(range(base_len, base_len + 4))
    assert qwen.latent_token_id == ids["latent_token_id"] and qwen.image_token == "<|image|>"
    assert add_lare_special_tokens(qwen) == ids and len(qwen) == base_len + 4  # idempotent
    assert ids["latent_token_id"] in qwen.all_special_ids
    qwen.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.image_token_id == ids["image_token_id"] and reloaded.latent_end_token == "<|latent_end|>"
    assert add_lare_special_tokens(reloaded) == ids and len(reloaded) == base_len + 4


# ---------------------------------------------------------------- processor


def test_image_and_latent_expansion(processor):
    text = f"<|im_start|>user\n<|image|>Which digit?<|im_end|>\n<|im_start|>assistant\n{LATENT_GROUP}"
    out = processor(images=[image()], text=text, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == 64
    assert ids.count(processor.latent_token_id) == 8  # K=4 x m=2
    assert ids.count(processor.latent_start_token_id) == ids.count(processor.latent_end_token_id) == 1
    assert ids[-1] == processor.latent_end_token_id and ids[-10] == processor.latent_start_token_id
    assert out["pixel_values"].shape == (1, 3, 64, 64)

    baseline = processor(images=[image()], text=processor.set_latent_slots(text, 0))["input_ids"][0]
    for token_id in (processor.latent_start_token_id, processor.latent_token_id, processor.latent_end_token_id):
        assert token_id not in baseline
    assert processor.decode(baseline).endswith("<|im_start|>assistant\n")
    processor.num_latent_steps = 1
    assert processor(text=LATENT_GROUP)["input_ids"][0].count(processor.latent_token_id) == 2
    processor.num_latent_steps = 4

    # already expanded text is left as it is
    expanded = processor.expand_latent_slots(text)
    assert processor.expand_latent_slots(expanded) == expanded
    assert processor(images=[image()], text=expanded, return_tensors="pt")["input_ids"].tolist() == [ids]


def test_batch_is_left_padded(processor):
    texts = [f"hi{LATENT_GROUP}", f"a much longer question about the left box{LATENT_GROUP}"]
    out = processor(text=texts, padding=True, return_tensors="pt")
    mask = out["attention_mask"]
    assert mask[1].all() and mask[0, 0] == 0 and mask[0, -1] == 1
    assert (out["input_ids"][0][mask[0] == 0] == processor.tokenizer.pad_token_id).all()
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == ["hi", texts[1][: -len(LATENT_GROUP)]]


def test_placeholder_and_argument_errors(processor):
    with pytest.raises(ValueError, match=r"2 <\|image\|> placeholder\(s\).*but 1 image\(s\)"):
        processor(images=[image()], text="<|image|><|image|>two?")
    with pytest.raises(ValueError, match=r"0 <\|image\|> placeholder\(s\).*but 1 image"):
        processor(images=[image()], text="no placeholder")
    with pytest.raises(ValueError, match=r"1 <\|image\|> placeholder\(s\).*but 0 image"):
        processor(text="<|image|>where is the image?")
    with pytest.raises(ValueError, match="num_latent_steps must be >= 0"):
        processor.num_latent_steps = -1
    with pytest.raises(TypeError, match="takes no num_latent_steps"):
        processor(text="hi", num_latent_steps=2)
    with pytest.raises(ValueError, match="add_lare_special_tokens"):
        LaReProcessor(CLIPImageProcessorPil(), Qwen2Tokenizer(vocab=dict(tokenization._trained_bpe(10)[0]), merges=[]))


def test_chat_template_rendering(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "Shape?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|image|>Colour?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nShape?<|im_end|>\n"
        "<|im_start|>assistant\n<|latent_start|>" + "<|latent|>" * 8 + "<|latent_end|>"
    )
    assert processor.apply_chat_template(messages).endswith("Shape?<|im_end|>\n")
    assert processor.chat_template == lare_chat_template(4, 2)
    assert processor.apply_chat_template(messages, add_generation_prompt=True, num_latent_steps=0).endswith(
        "<|im_start|>assistant\n"
    )


def test_apply_chat_template_with_pil_image(processor):
    inputs = processor.apply_chat_template(
        user("Which digit is in the red square?"),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == 64 and ids.count(processor.latent_token_id) == 8
    assert ids[-1] == processor.latent_end_token_id


# ---------------------------------------------------------------- training inputs


def test_build_training_inputs_layout(processor):
    prompts = [
        processor.apply_chat_template(user("Digit?"), add_generation_prompt=True),
        processor.apply_chat_template(
            user("Which digit is inside the blue circle on the left?"), add_generation_prompt=True
        ),
    ]
    answers = ["The answer is 7.", "3"]
    batch = processor.build_training_inputs(prompts, answers, images=[image(1), image(2)])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and batch["pixel_values"].shape == (2, 3, 64, 64)
    pad, im_end = processor.tokenizer.pad_token_id, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    # latent slots at the same columns in every row, the answer starts right after <|latent_end|>
    slot_columns = [(row == processor.latent_token_id).nonzero().flatten().tolist() for row in ids]
    assert slot_columns[0] == slot_columns[1] and len(slot_columns[0]) == 8
    end_column = slot_columns[0][-1] + 1
    assert (ids[:, end_column] == processor.latent_end_token_id).all()
    # row 0 has the shorter prompt: left padding; row 1 has the shorter answer: right padding
    assert mask[0, 0] == 0 and ids[0, 0] == pad and mask[1, : end_column + 1].all()
    assert mask[1, -1] == 0 and ids[1, -1] == pad and mask[0, -1] == 1
    assert ((mask == 0) == (ids == pad)).all()

    for row, answer in enumerate(answers):
        expected = processor.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
        supervised = labels[row][labels[row] != -100].tolist()
        assert supervised == expected and supervised[-1] == im_end
        assert (labels[row, : end_column + 1] == -100).all()
        assert ids[row, end_column + 1 : end_column + 1 + len(expected)].tolist() == expected
        # the prompt part is exactly what the processor gives at inference time
        prompt_ids = processor(images=[image(row + 1)], text=prompts[row])["input_ids"][0]
        assert ids[row, : end_column + 1][mask[row, : end_column + 1] == 1].tolist() == prompt_ids


def test_build_training_inputs_from_messages_rationales_and_k0(processor):
    prompts = [user("Which shape is above the box?"), user("Sum of the digits?", with_image=False)]
    batch = processor.build_training_inputs(
        prompts, ["circle", "9"], rationales=["the circle is above the box", "4 + 5 = 9"], max_rationale_length=4
    )
    assert batch["pixel_values"].shape == (1, 3, 64, 64)  # images taken from the messages
    assert batch["rationale_input_ids"].shape == batch["rationale_attention_mask"].shape == (2, 4)
    rationale = processor.tokenizer.encode("4 + 5 = 9", add_special_tokens=False)
    assert batch["rationale_input_ids"][1].tolist()[: len(rationale[:4])] == rationale[:4]
    short = processor.build_training_inputs(prompts, ["circle", "9"], rationales=["a b c d e f", "x"])
    assert short["rationale_attention_mask"][1].tolist()[0] == 1 and short["rationale_attention_mask"][1, -1] == 0
    assert short["rationale_input_ids"][1, -1] == processor.tokenizer.pad_token_id

    baseline = processor.build_training_inputs(prompts, ["circle", "9"], num_latent_steps=0, max_answer_length=1)
    for token_id in (processor.latent_start_token_id, processor.latent_token_id, processor.latent_end_token_id):
        assert token_id not in baseline["input_ids"]
    assert (baseline["labels"] != -100).sum(dim=1).tolist() == [1, 1]
    assert "rationale_input_ids" not in baseline


def test_build_training_inputs_errors(processor):
    prompt = processor.apply_chat_template(user("Digit?", with_image=False), add_generation_prompt=True)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        processor.build_training_inputs([prompt, prompt], ["7"])
    with pytest.raises(ValueError, match="2 prompts but 3 rationales"):
        processor.build_training_inputs([prompt, prompt], ["7", "8"], rationales=["a", "b", "c"])
    with pytest.raises(ValueError, match="Rationale 1 is 3; give a non-empty string, or None"):
        processor.build_training_inputs([prompt, prompt], ["7", "8"], rationales=["a", 3])
    with pytest.raises(ValueError, match="Rationale 0 is ''"):
        processor.build_training_inputs([prompt], ["7"], rationales=[""])
    with pytest.raises(ValueError, match="Prompt 0 has 1 <\\|image\\|> placeholder"):
        processor.build_training_inputs(
            [prompt.replace("Digit?", "<|image|>Digit?"), prompt], ["7", "8"], images=[None, image()]
        )
    with pytest.raises(ValueError, match="does not end with the latent region"):
        processor.build_training_inputs(["<|im_start|>user\n<|image|>hi<|im_end|>\n"], ["7"], images=[image()])
    with pytest.raises(ValueError, match="num_latent_steps must be >= 0"):
        processor.build_training_inputs([prompt], ["7"], num_latent_steps=-2)


# ---------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip(processor, tmp_path):
    AutoConfig.register("lare", LaReConfig, exist_ok=True)
    AutoProcessor.register(LaReConfig, LaReProcessor, exist_ok=True)
    processor.num_latent_steps = 3
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == lare_chat_template(3, 2)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert (saved["num_latent_steps"], saved["latent_tokens_per_step"], saved["image_seq_length"]) == (3, 2, 64)
    config = LaReConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           patch_size=8, image_size=64),
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024),
        image_seq_length=64, window_size=4, window_stride=2, extractor_num_heads=4, latent_tokens_per_step=2,
        use_reconstructor=False, **add_lare_special_tokens(processor.tokenizer),
    )  # fmt: skip
    config.save_pretrained(tmp_path)

    messages = user("Which digit is in the red square?")
    expected = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    for loaded in (LaReProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded).__name__ == "LaReProcessor"
        assert isinstance(loaded.image_processor, CLIPImageProcessorPil)
        assert loaded.image_processor.crop_size == {"height": 64, "width": 64}
        assert (loaded.num_latent_steps, loaded.latent_tokens_per_step, loaded.image_seq_length) == (3, 2, 64)
        assert loaded.chat_template == lare_chat_template(3, 2)
        assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        assert loaded.latent_token_id == config.latent_token_id and loaded.image_token_id == config.image_token_id
        again = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert again["input_ids"] == expected["input_ids"]
        torch.testing.assert_close(
            torch.as_tensor(np.array(again["pixel_values"])), torch.as_tensor(np.array(expected["pixel_values"]))
        )
        assert again["input_ids"][0].count(loaded.latent_token_id) == 6  # K=3 (saved) x m=2


def test_processing_module_is_self_contained():
    """The module is copied next to checkpoints as custom code: stdlib, torch and transformers imports only.

    transformers requires every import outside a try block (`get_imports`); the build-time helpers of
    `LaReProcessor.from_components` are imported inside one, so a Hub copy loads where lare_hf is not installed
    (loaded that way in tests/test_components.py)."""
    from transformers.dynamic_module_utils import get_imports

    tree = ast.parse(inspect.getsource(processing_lare))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
    required = set(get_imports(processing_lare.__file__))
    assert required - set(sys.stdlib_module_names) <= {"torch", "transformers"}


def test_rationale_truncation_leaves_the_saved_tokenizer_untouched(tmp_path):
    """Truncating rationales must not store a truncation setting in the tokenizer a trained checkpoint saves."""
    import json

    from PIL import Image

    from lare_hf.build import build_tiny

    _, processor = build_tiny()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    batch = processor.build_training_inputs(
        [messages] * 2, ["1", "2"], images=[Image.new("RGB", (64, 64))] * 2, rationales=["a " * 50, "b"],
        max_rationale_length=8,
    )  # fmt: skip
    assert batch["rationale_input_ids"].shape == (2, 8)
    assert batch["rationale_attention_mask"][1].tolist() == [1] + [0] * 7
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["truncation"] is None
    assert "max_length" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


# ---------------------------------------------------------------- transformers' processor conventions (issue 10)


def test_tokenizer_and_processor_chat_templates_give_the_same_ids(processor, tmp_path):
    """The chat template writes the K*m latent slots itself, so the tokenizer alone renders the processor's prompt
    (the region follows an image; a text-only chat has none)."""
    text_only = user("Which digit?", with_image=False)
    by_processor = processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True)[0]
    by_tokenizer = processor.tokenizer.apply_chat_template(text_only, add_generation_prompt=True)["input_ids"]
    assert by_processor == by_tokenizer and processor.latent_start_token_id not in by_processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]}]

    def both(proc, tokenizer, **kwargs):
        by_processor = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        by_tokenizer = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        return by_processor, by_tokenizer

    text, tokenizer_text = both(processor, processor.tokenizer)
    assert text == tokenizer_text and text.count(processor.latent_token) == 8  # K=4 x m=2
    for steps in (0, 1, 3):  # one call's K is a template variable, for both
        text, tokenizer_text = both(processor, processor.tokenizer, num_latent_steps=steps)
        assert text == tokenizer_text and text.count(processor.latent_token) == 2 * steps
    processor.num_latent_steps = 3  # the template's default K follows the processor's attribute
    text, tokenizer_text = both(processor, processor.tokenizer)
    assert text == tokenizer_text and text.count(processor.latent_token) == 6
    processor.save_pretrained(tmp_path)
    text, tokenizer_text = both(LaReProcessor.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path))
    assert text == tokenizer_text and text.count(processor.latent_token) == 6
    # a tokenizer that brings its own template keeps it
    own = build_tiny_tokenizer()
    own.chat_template = "{{ messages[0]['content'] }}"
    assert LaReProcessor(processor.image_processor, own).tokenizer.chat_template == "{{ messages[0]['content'] }}"


def test_call_takes_k_from_the_processor_and_keeps_the_tokenizer_padding_default(processor):
    parameters = inspect.signature(LaReProcessor.__call__).parameters
    assert "num_latent_steps" not in parameters and hasattr(processor, "num_latent_steps")
    assert all(parameters[name].annotation is not inspect.Parameter.empty for name in ("images", "text", "kwargs"))
    assert inspect.signature(LaReProcessor.__call__).return_annotation is not inspect.Signature.empty

    texts = ["hi", "a much longer question about the left box"]
    unpadded = processor(text=texts)["input_ids"]
    assert [len(row) for row in unpadded] == [len(row) for row in processor.tokenizer(texts)["input_ids"]]
    assert len(unpadded[0]) < len(unpadded[1])  # the tokenizer's own default: no padding
    with pytest.raises(ValueError, match="padding"):
        processor(text=texts, return_tensors="pt")
    padded = processor(text=texts, padding=True, return_tensors="pt")
    assert padded["attention_mask"][0, 0] == 0 and padded["attention_mask"][0, -1] == 1  # left padding


def test_saving_keeps_the_auto_class_state_of_the_instance(processor, tmp_path):
    assert type(processor)._auto_class == "AutoProcessor"  # `import lare_hf` registers it for custom code
    before = processor.to_dict()
    processor.save_pretrained(tmp_path / "first")
    assert processor.to_dict() == before and "auto_map" not in processor.__dict__
    assert "auto_map" not in processor.image_processor.__dict__
    saved = json.loads((tmp_path / "first" / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_lare.LaReProcessor"}  # the files still carry it
    processor.save_pretrained(tmp_path / "second")
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer_config.json"):
        assert (tmp_path / "first" / name).read_text() == (tmp_path / "second" / name).read_text()
    loaded = LaReProcessor.from_pretrained(tmp_path / "first")
    assert loaded.to_dict() == processor.to_dict()
