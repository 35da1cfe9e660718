"""From LLaVA to LaRe in one call: `from_llava` on the model and the processor, and `lare build --from-llava`.

Tiny random `LlavaForConditionalGeneration` models (CLIP vision + Llama LM, SigLIP vision + Qwen2 LM) are built
here; the converted LaRe at K=0 must compute what the LLaVA model computes, and at K=4 train, generate, save and load.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken, Tokenizer
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from conftest import make_image
from lare_hf import LaReForConditionalGeneration, LaReProcessor
from lare_hf.cli import main
from lare_hf.modeling.reconstruction import TINY_IMAGE_TOKENIZER_CONFIG, TINY_RECONSTRUCTOR_CONFIG
from lare_hf.processing.tokenization import LARE_SPECIAL_TOKENS, build_tiny_tokenizer

# llava-hf/llava-1.5-7b-hf's chat template (its chat_template.json).
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is the cell?"}]}]
# Small LaRe modules for a 64-wide LM (an 8x8 patch grid); the paper's Extractor default is tested separately.
SMALL = dict(
    extractor_hidden_size=None, extractor_num_heads=4, latent_tokens_per_step=2, window_size=4, window_stride=2
)
TINY_RECONSTRUCTOR = dict(
    reconstructor_config=TINY_RECONSTRUCTOR_CONFIG,
    image_tokenizer_config=TINY_IMAGE_TOKENIZER_CONFIG,
    reconstruction_image_size=64,
)


def llava_tokenizer() -> PreTrainedTokenizerFast:
    """The offline tiny tokenizer as a LLaVA checkpoint has it: LLaVA's `<image>` token, no LaRe tokens."""
    data = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    lare_tokens = set(LARE_SPECIAL_TOKENS.values())
    data["added_tokens"] = [token for token in data["added_tokens"] if token["content"] not in lare_tokens]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tokenizer


def tiny_llava(vision: str, strategy: str, feature_layer: int | list[int], seed: int = 0):
    """A random `LlavaForConditionalGeneration` (CLIP + Llama or SigLIP + Qwen2, 64 px, 8 px patches) and its
    `LlavaProcessor` with LLaVA-1.5's chat template."""
    tokenizer = llava_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
                 image_size=64)  # fmt: skip
    lm = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    if vision == "clip":
        vision_config, text_config, has_cls = CLIPVisionConfig(**tower), LlamaConfig(**lm), True
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    else:
        vision_config, text_config, has_cls = SiglipVisionConfig(**tower), Qwen2Config(**lm), False
        image_processor = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    num_tokens = 64 + int(has_cls) - int(strategy == "default")
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=num_tokens,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
    )
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(has_cls),
        chat_template=LLAVA_15_TEMPLATE,
    )
    return llava, processor


def convert(llava, processor, num_latent_steps: int, **config_kwargs):
    model = LaReForConditionalGeneration.from_llava(
        llava, tokenizer=processor.tokenizer, num_latent_steps=num_latent_steps, **config_kwargs
    ).eval()
    lare_processor = LaReProcessor.from_llava(processor, num_latent_steps=num_latent_steps, latent_tokens_per_step=2)
    return model, lare_processor


EQUIVALENCE_CASES = [
    ("clip", "default", -2),
    ("clip", "full", [-3, -1]),
    ("siglip", "full", -1),
    ("siglip", "full", [0, -2]),
]


@pytest.mark.parametrize(("vision", "strategy", "feature_layer"), EQUIVALENCE_CASES)
def test_converted_lare_at_k0_computes_what_llava_computes(vision, strategy, feature_layer):
    llava, llava_processor = tiny_llava(vision, strategy, feature_layer)
    image = make_image(3)
    text = llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    llava_inputs = llava_processor(images=image, text=text, return_tensors="pt")
    vocab = llava.config.text_config.vocab_size
    with torch.no_grad():
        llava_logits = llava(**llava_inputs).logits
    image_token_id = llava.config.image_token_id
    llava_tokens = llava.generate(**llava_inputs, max_new_tokens=6, do_sample=False, suppress_tokens=[image_token_id])

    model, processor = convert(llava, llava_processor, num_latent_steps=0, use_reconstructor=False, **SMALL)
    for name in ("vision_feature_layer", "vision_feature_select_strategy", "image_seq_length", "image_token_id"):
        assert getattr(model.config, name) == getattr(llava.config, name), name
    assert processor.image_token == "<image>" and processor.image_seq_length == llava.config.image_seq_length
    lare_text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert lare_text == text  # K = 0: the checkpoint's own template, no latent region
    inputs = processor(images=image, text=lare_text, return_tensors="pt")
    torch.testing.assert_close(inputs["input_ids"], llava_inputs["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(inputs["pixel_values"], llava_inputs["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == vocab + 3  # the three latent tokens added
    assert (logits[..., :vocab] - llava_logits).abs().max().item() <= 1e-5
    tokens = model.generate(**inputs, max_new_tokens=6)
    assert tokens.tolist() == llava_tokens.tolist()


@pytest.mark.parametrize(("vision", "feature_layer"), [("clip", [-3, -1]), ("siglip", -1)])
def test_converted_lare_at_k4_trains_generates_saves_and_loads(tmp_path, vision, feature_layer):
    """K=4 on the converted model ("full": with CLIP the CLS token is fed but is not on the window grid): every
    loss of Eq. 10, generate, save, and load through the Auto classes."""
    llava, llava_processor = tiny_llava(vision, "full", feature_layer)
    model, processor = convert(llava, llava_processor, num_latent_steps=4, **SMALL, **TINY_RECONSTRUCTOR)
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text.endswith("ASSISTANT:<|latent_start|>" + "<|latent|>" * 8 + "<|latent_end|>")
    batch = processor.build_training_inputs(
        prompts=[MESSAGES] * 2,
        answers=["red", "blue"],
        images=[make_image(0), make_image(1)],
        rationales=["The start cell is red.", "The start cell is blue."],
    )
    model.train()
    out = model(**batch, compute_latent_losses=True)
    for name in ("lm_loss", "alignment_loss", "image_reconstruction_loss", "text_reconstruction_loss", "loss"):
        value = getattr(out, name)
        assert value is not None and torch.isfinite(value), name
    out.loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith(("model.extractor.", "reconstructor.unet.")):
            assert parameter.grad is not None, name
    assert out.window_positions.shape == (2, 4, 2) and out.saliency_maps.shape == (2, 4, 8, 8)
    model.eval()
    inputs = processor(images=make_image(2), text=text, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, eos_token_id=None)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LaReForConditionalGeneration
    assert loaded.config.vision_feature_layer == feature_layer
    assert loaded_processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == text
    assert loaded_processor.end_of_turn_token == processor.end_of_turn_token
    again = loaded_processor(images=make_image(2), text=text, return_tensors="pt")
    torch.testing.assert_close(again["input_ids"], inputs["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, model(**inputs).logits)


def test_converted_template_renders_string_content_and_earlier_turns():
    """Data in the chat format gives earlier answers as strings; LLaVA-1.5's template selects content parts by type,
    so the processor passes string content as one text part (LaRe's own template renders both forms alike)."""
    llava, llava_processor = tiny_llava("clip", "default", -2)
    processor = LaReProcessor.from_llava(llava_processor, num_latent_steps=1, latent_tokens_per_step=2)
    conversation = MESSAGES + [
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the next one?"},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == (
        "USER: <image>\nWhich colour is the cell? ASSISTANT: Red. USER: And the next one? "
        "ASSISTANT:<|latent_start|><|latent|><|latent|><|latent_end|>"
    )
    assert processor.end_of_turn_token == llava_processor.tokenizer.eos_token


def test_from_llava_copies_every_weight_and_defaults_to_the_paper_extractor():
    """Nothing LLaVA trained is re-initialised; the Extractor is Appendix B's (1536 wide, 12 heads)."""
    llava, llava_processor = tiny_llava("clip", "default", -2)
    model = LaReForConditionalGeneration.from_llava(
        llava, tokenizer=llava_processor.tokenizer, use_reconstructor=False, window_size=4
    )
    assert model.config.extractor_hidden_size == 1536 and model.config.extractor_num_heads == 12
    lare_state = model.state_dict()
    vocab = llava.config.text_config.vocab_size
    for name, tensor in llava.state_dict().items():
        lare_tensor = lare_state[name]
        if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            lare_tensor = lare_tensor[:vocab]  # the rows after `vocab` are the added latent tokens
        torch.testing.assert_close(lare_tensor, tensor, rtol=0, atol=0, msg=name)


def test_siglip_with_default_selection_is_refused_naming_the_lost_patch():
    llava, llava_processor = tiny_llava("siglip", "default", -1)
    with pytest.raises(ValueError, match="without a CLS token \\(SigLIP\\) with 'default' loses a real patch"):
        LaReForConditionalGeneration.from_llava(llava, tokenizer=llava_processor.tokenizer, **SMALL)


def test_llava_next_is_refused_naming_the_tiling(tmp_path):
    LlavaNextConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llava_next' checkpoint.*tiles each image into several crops"):
        LaReForConditionalGeneration.from_llava(str(tmp_path))
    with pytest.raises(ValueError, match="'llava_next' checkpoint"):
        LaReProcessor.from_llava(str(tmp_path))


def test_lare_build_from_llava_folder(tmp_path):
    llava, llava_processor = tiny_llava("clip", "full", -2)
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")
    out = tmp_path / "lare"
    code = main(["build", "--from-llava", str(tmp_path / "llava"), "--output", str(out), "--no-reconstructor",
                 "--set", "extractor_hidden_size=null", "extractor_num_heads=4", "latent_tokens_per_step=2",
                 "window_size=4", "window_stride=2", "num_latent_steps=0"])  # fmt: skip
    assert code == 0
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.components["llava"]["source"] == str(tmp_path / "llava")
    assert model.config.vision_feature_select_strategy == "full" and model.config.image_seq_length == 65
    image = make_image(4)
    text = llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    llava_inputs = llava_processor(images=image, text=text, return_tensors="pt")
    inputs = processor(images=image, text=processor.apply_chat_template(MESSAGES, add_generation_prompt=True))
    assert inputs["input_ids"] == llava_inputs["input_ids"].tolist()
    with torch.no_grad():
        expected = llava(**llava_inputs).logits
        logits = model(**processor(images=image, text=text, return_tensors="pt")).logits
    assert (logits[..., : expected.shape[-1]] - expected).abs().max().item() <= 1e-5


def test_a_converted_llava_starts_at_stage_2_training_only_the_latent_modules(tmp_path):
    """`lare build --from-llava` then `lare train --stage 2`: the Extractor learns, the converted vision tower,
    projector and LM stay as LLaVA trained them (stage II trains on the frozen model)."""

    from safetensors.torch import load_file

    llava, llava_processor = tiny_llava("clip", "default", -2)
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")
    (tmp_path / "data" / "images").mkdir(parents=True)
    with open(tmp_path / "data" / "train.jsonl", "w") as handle:
        for index in range(4):
            make_image(100 + index).save(tmp_path / "data" / "images" / f"{index}.png")
            record = {"id": f"r{index}", "image": f"images/{index}.png", "question": "Which digit?",
                      "rationale": f"The red square holds the digit {index}.", "answer": str(index)}  # fmt: skip
            handle.write(json.dumps(record) + "\n")
    start, trained = tmp_path / "lare", tmp_path / "stage2"
    assert main(["build", "--from-llava", str(tmp_path / "llava"), "--output", str(start), "--no-reconstructor",
                 "--set", "extractor_hidden_size=null", "extractor_num_heads=4", "latent_tokens_per_step=2",
                 "window_size=4", "window_stride=2", "num_latent_steps=2"]) == 0  # fmt: skip
    assert main(["train", "--stage", "2", "--config", "tiny/stage2", "--model", str(start),
                 "--train_file", str(tmp_path / "data" / "train.jsonl"), "--output_dir", str(trained),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--latent_lr", "1e-2",
                 "--save_steps", "1000", "--num_latent_steps", "2"]) == 0  # fmt: skip
    before, after = load_file(start / "model.safetensors"), load_file(trained / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("model.extractor.") for name in changed)
    frozen = ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.")
    assert not {name for name in changed if name.startswith(frozen)}


def test_from_llava_refuses_to_override_what_the_checkpoint_was_trained_for():
    llava, llava_processor = tiny_llava("clip", "default", -2)
    with pytest.raises(ValueError, match="takes vision_feature_layer from the LLaVA checkpoint"):
        LaReForConditionalGeneration.from_llava(llava, tokenizer=llava_processor.tokenizer, vision_feature_layer=-1)
