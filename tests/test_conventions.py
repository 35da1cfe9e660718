"""In-tree transformers conventions on the real `lare-tiny` checkpoint: output options, attention backends,
inputs_embeds, generation modes and outputs, image features, loss kwargs, parallelism plans, headless loading."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conftest import chat, make_image
from lare_hf.modeling.refocus import LARE_ATTENTION

GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}


def prompts(processor, questions=("what digit?", "which container is left of the blue circle?"), seeds=(0, 1)):
    texts = [
        processor.apply_chat_template(chat(make_image(seed), question), add_generation_prompt=True, tokenize=False)
        for question, seed in zip(questions, seeds)
    ]
    return processor(text=texts, images=[make_image(seed) for seed in seeds], padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def eager_model(tiny_checkpoint):
    return AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()


def single_pass(model, inputs, latent_embeds):
    """The language model run once over the final sequence (latents written into their slots)."""
    inner = model.model
    embeds, _, _ = inner.embed_multimodal(inputs["input_ids"], inputs["pixel_values"])
    slots = inputs["input_ids"] == model.config.latent_token_id
    embeds = embeds.masked_scatter(slots.unsqueeze(-1), latent_embeds.flatten(1, 2))
    mask = inputs["attention_mask"]
    return inner.language_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        output_attentions=True,
        output_hidden_states=True,
    )


@torch.no_grad()
def test_forward_returns_attentions_and_hidden_states_over_every_position(eager_model, tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    model = eager_model
    inputs = prompts(processor)
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    text_config = model.config.text_config
    batch, length = inputs["input_ids"].shape
    assert len(out.hidden_states) == text_config.num_hidden_layers + 1
    assert len(out.attentions) == text_config.num_hidden_layers
    assert all(h.shape == (batch, length, text_config.hidden_size) for h in out.hidden_states)
    assert all(a.shape == (batch, text_config.num_attention_heads, length, length) for a in out.attentions)
    # The loop feeds the sequence in K + 1 calls; joined, its outputs are what one causal pass gives.
    reference = single_pass(model, inputs, out.latent_embeds)
    real = inputs["attention_mask"].bool()  # padded query rows are undefined in any backend
    for ours, theirs in zip(out.hidden_states, reference.hidden_states):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-4)
    for ours, theirs in zip(out.attentions, reference.attentions):
        torch.testing.assert_close(ours.transpose(1, 2)[real], theirs.transpose(1, 2)[real], atol=1e-5, rtol=1e-4)
    # Decoding from the cache: one new position, keys over everything fed so far.
    assert out.past_key_values is not None  # use_cache defaults to the text config's (True)
    step = model(
        input_ids=torch.full((batch, 1), 10),
        attention_mask=torch.cat([inputs["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], 1),
        past_key_values=out.past_key_values,
        output_attentions=True,
        output_hidden_states=True,
    )
    assert step.hidden_states[0].shape == (batch, 1, text_config.hidden_size)
    assert step.attentions[0].shape[-2:] == (1, length + 1)


@torch.no_grad()
def test_return_dict_false_and_use_cache_false(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = prompts(processor)
    out = model(**inputs)
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.logits)
    assert model(**inputs, use_cache=False).past_key_values is None
    headless = model.model(**inputs, return_dict=False, use_cache=False)
    assert isinstance(headless, tuple)
    torch.testing.assert_close(model.lm_head(headless[0]), out.logits)


def test_retain_grad_on_attentions_and_hidden_states_of_the_decoding_path(eager_model, tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    inputs = prompts(processor)
    with torch.no_grad():
        cache = eager_model(**inputs).past_key_values
    step = eager_model(
        input_ids=torch.full((2, 1), 10),
        attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
        past_key_values=cache,
        output_attentions=True,
        output_hidden_states=True,
    )
    hidden, attention = step.hidden_states[1], step.attentions[0]
    hidden.retain_grad()
    attention.retain_grad()
    step.logits.sum().backward()
    assert hidden.grad is not None and attention.grad is not None


@torch.no_grad()
def test_attention_backends_give_the_same_saliency_latents_and_logits(tiny_checkpoint, tiny_model_and_processor):
    """The user's backend runs the language model; saliency is captured on its q/k in every backend."""
    sdpa_model, processor = tiny_model_and_processor
    inputs = prompts(processor)
    reference = sdpa_model(**inputs)
    language_model = sdpa_model.model.language_model
    assert language_model.config._attn_implementation == "sdpa"  # not replaced by the saliency wrapper
    backends = ["eager"]
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        backends.append("flex_attention")
    except ImportError:
        pass
    for backend in backends:
        model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, attn_implementation=backend).eval()
        language_model = model.model.language_model
        assert language_model.config._attn_implementation == backend
        try:
            out = model(**inputs)
        except Exception as error:  # flex attention needs a compiler on CPU; eager must always work
            if backend == "eager":
                raise
            pytest.skip(f"{backend} does not run on this machine: {error}")
        assert language_model.config._attn_implementation == backend  # restored after the loop
        torch.testing.assert_close(out.saliency_maps, reference.saliency_maps, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.latent_embeds, reference.latent_embeds, atol=1e-5, rtol=1e-4)
        real = inputs["attention_mask"].bool()  # padded positions are undefined in any backend
        torch.testing.assert_close(out.logits[real], reference.logits[real], atol=1e-4, rtol=1e-4)
        assert torch.equal(out.window_positions, reference.window_positions)
    # set_attn_implementation switches the language model too, and the saliency stays the same.
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    model.set_attn_implementation("eager")
    assert model.model.language_model.config._attn_implementation == "eager"
    torch.testing.assert_close(model(**inputs).saliency_maps, reference.saliency_maps, atol=1e-5, rtol=1e-4)
    with pytest.raises(KeyError):
        model.set_attn_implementation(LARE_ATTENTION + "-not-registered")


@torch.no_grad()
def test_generate_dict_outputs_for_every_decoding_mode(eager_model, tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    model = eager_model
    inputs = prompts(processor)
    batch, length = inputs["input_ids"].shape
    plain = model.generate(**inputs, **GREEDY)
    options = {
        "return_dict_in_generate": True,
        "output_scores": True,
        "output_logits": True,
        "output_attentions": True,
        "output_hidden_states": True,
    }
    greedy = model.generate(**inputs, **GREEDY, **options)
    assert isinstance(greedy, GenerateDecoderOnlyOutput) and torch.equal(greedy.sequences, plain)
    assert len(greedy.scores) == len(greedy.logits) == len(greedy.attentions) == len(greedy.hidden_states) == 4
    # the first step is the prefill (latent loop): entries over the whole prompt; then one position per step
    assert greedy.attentions[0][0].shape[-2:] == (length, length)
    assert greedy.hidden_states[0][0].shape[1] == length
    assert greedy.attentions[3][0].shape[-2:] == (1, length + 3)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, **options)
    assert isinstance(sampled, GenerateDecoderOnlyOutput) and sampled.sequences.shape == (batch, length + 3)
    for do_sample in (False, True):
        beams = model.generate(
            **inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=do_sample, **options
        )
        assert isinstance(beams, GenerateBeamDecoderOnlyOutput)
        assert beams.sequences.shape == (batch, length + 3) and len(beams.scores) == 3


@torch.no_grad()
def test_generate_without_cache_and_with_a_static_cache_gives_the_same_tokens(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = prompts(processor)
    cached = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, use_cache=False, **GREEDY), cached)
    # The static cache is sized by GenerationMixin for prompt (latent slots included) + new tokens.
    assert torch.equal(model.generate(**inputs, cache_implementation="static", **GREEDY), cached)


@pytest.mark.slow
@torch.no_grad()
def test_generate_compiles_the_static_cache_decode_step_with_the_eager_tokens(tiny_checkpoint):
    """generate() with a static cache runs the decode step through torch.compile (fullgraph: a graph break is an
    error), as for any transformers LM; the prefill runs the latent loop eagerly. On CPU transformers compiles only
    when the compile config says so (`_compile_all_devices`, as its own tests set it); on GPU it does by default."""
    from transformers import AutoProcessor, CompileConfig

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    inputs = prompts(AutoProcessor.from_pretrained(tiny_checkpoint))
    assert model._can_compile_fullgraph
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    for num_latent_steps in (4, 0):
        eager = model.generate(**inputs, num_latent_steps=num_latent_steps, max_new_tokens=6, min_new_tokens=6)
        compiled = model.generate(
            **inputs,
            num_latent_steps=num_latent_steps,
            max_new_tokens=6,
            min_new_tokens=6,
            cache_implementation="static",
            compile_config=compile_config,
        )
        assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step"
        assert torch.equal(compiled, eager), num_latent_steps


@torch.no_grad()
def test_generate_continues_from_its_own_cache(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = prompts(processor)
    whole = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, -3:])], dim=1)
    second = model.generate(
        input_ids=first.sequences,
        attention_mask=mask,
        pixel_values=inputs["pixel_values"],
        past_key_values=first.past_key_values,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
    )
    assert torch.equal(second, whole)


@torch.no_grad()
def test_inputs_embeds_equal_input_ids(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = prompts(processor)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_ids = model(**inputs)
    by_embeds = model(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
    )
    torch.testing.assert_close(by_embeds.logits, by_ids.logits)
    torch.testing.assert_close(by_embeds.saliency_maps, by_ids.saliency_maps)
    # generate(inputs_embeds=...) returns only the new tokens, as GenerationMixin does
    new_tokens = model.generate(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"], **GREEDY
    )
    assert torch.equal(new_tokens, model.generate(**inputs, **GREEDY)[:, -4:])
    # A text-only prompt (K = 0) generates from inputs_embeds alone.
    text = processor.apply_chat_template(chat(None, "hello"), add_generation_prompt=True, num_latent_steps=0)
    text_inputs = processor(text=[text], return_tensors="pt")
    text_embeds = model.get_input_embeddings()(text_inputs["input_ids"])
    assert torch.equal(
        model.generate(inputs_embeds=text_embeds, attention_mask=text_inputs["attention_mask"], **GREEDY),
        model.generate(**text_inputs, **GREEDY)[:, -4:],
    )
    with pytest.raises(ValueError, match="num_latent_steps rewrites the latent slots of input_ids"):
        model.generate(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], num_latent_steps=1, **GREEDY)


@torch.no_grad()
def test_get_image_features_returns_pooled_projected_features(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = prompts(processor)
    features = model.get_image_features(inputs["pixel_values"])
    assert isinstance(features, BaseModelOutputWithPooling)
    torch.testing.assert_close(features.pooler_output, model(**inputs).image_hidden_states)
    # only the feature layer is captured unless all hidden states are asked for
    assert sum(state is not None for state in features.hidden_states) == 1
    every = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
    assert all(state is not None for state in every.hidden_states)


@torch.no_grad()
def test_forward_returns_the_vision_towers_output_as_image_outputs(eager_model, tiny_model_and_processor):
    """As transformers' VLMs since 5.25 (`LlavaModelOutputWithPast.image_outputs`): the vision tower's output with
    `pooler_output` = V_T, its attentions when asked for, a nested tuple in `to_tuple()`, None without images."""
    _, processor = tiny_model_and_processor
    inputs = prompts(processor)
    out = eager_model(**inputs, output_attentions=True)
    assert isinstance(out.image_outputs, BaseModelOutputWithPooling)
    assert out.image_outputs.pooler_output.shape[0] == inputs["pixel_values"].shape[0]
    torch.testing.assert_close(out.image_outputs.pooler_output, out.image_hidden_states)
    vision_layers = eager_model.config.vision_config.num_hidden_layers
    assert out.image_outputs.attentions is not None and len(out.image_outputs.attentions) == vision_layers
    assert eager_model(**inputs).image_outputs.attentions is None  # only when asked for
    as_tuple = eager_model(**inputs, return_dict=False)
    assert isinstance(as_tuple[-1], tuple)
    torch.testing.assert_close(as_tuple[-1][1], out.image_outputs.pooler_output)
    text_only = processor(text=["what digit?"], return_tensors="pt")
    assert eager_model(**text_only).image_outputs is None


def test_loss_function_receives_num_items_in_batch_and_shift_labels(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    inputs = prompts(processor)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = 20
    with torch.no_grad():
        mean = model(**inputs, labels=labels).lm_loss
        summed = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(1)).lm_loss
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        by_shift = model(**inputs, labels=labels, shift_labels=shifted).lm_loss
    num_targets = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(summed, mean * num_targets)
    torch.testing.assert_close(by_shift, mean)


def test_parallelism_plans_cover_the_tied_head(tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert model._pp_plan["lm_head"] == (["hidden_states"], ["logits"])
    assert any(name.startswith("model.language_model.layers") for name in model.tp_plan)


def test_headless_auto_model_loads_a_full_checkpoint_quietly(tiny_checkpoint, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            model = AutoModel.from_pretrained(tiny_checkpoint)
    finally:
        hf_logging.disable_propagation()
    assert type(model).__name__ == "LaReModel"
    assert "unexpected" not in caplog.text.lower() and "alignment_head" not in caplog.text


def test_without_pixel_values_the_prompt_is_read_as_text(tiny_model_and_processor, caplog):
    """As LLaVA reads its image token without pixels: placeholders embed as ordinary tokens, no latent phase runs,
    the output is the language model's own, and a warning (once) points at the forgotten pixel_values."""
    model, processor = tiny_model_and_processor
    inputs = prompts(processor)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lare_hf"), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        alone = model.model.language_model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        )
    torch.testing.assert_close(out.logits, model.lm_head(alone.last_hidden_state))
    assert out.latent_embeds is None and out.window_positions is None
    assert "no pixel_values" in caplog.text and "read as text" in caplog.text
    with torch.no_grad():  # with the image, the same ids run the latent loop
        assert model(**inputs).latent_embeds is not None


@torch.no_grad()
def test_packed_text_sequences_with_position_ids_match_padded_rows(tiny_model_and_processor):
    """Padding-free batches (one row, position_ids restarting at 0 per sequence, no attention_mask) give each
    sequence the logits it gets alone, as transformers' decoders do."""
    model, processor = tiny_model_and_processor
    sequences = [processor.tokenizer(text)["input_ids"] for text in ("what digit is it", "a blue circle on the left")]
    packed = torch.tensor([sum(sequences, [])])
    position_ids = torch.cat([torch.arange(len(ids)) for ids in sequences])[None]
    logits = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits[0]
    offset = 0
    for ids in sequences:
        alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        torch.testing.assert_close(logits[offset : offset + len(ids)], alone, rtol=1e-4, atol=1e-5)
        offset += len(ids)


@torch.no_grad()
def test_output_hidden_states_selects_layers_through_the_latent_loop(eager_model, tiny_model_and_processor):
    """`output_hidden_states=[indices]` (transformers 5) keeps only those entries, each over every position."""
    _, processor = tiny_model_and_processor
    inputs = prompts(processor)
    every = eager_model(**inputs, output_hidden_states=True).hidden_states
    some = eager_model(**inputs, output_hidden_states=[0, len(every) - 1]).hidden_states
    assert len(some) == len(every)
    for index, states in enumerate(some):
        if index in (0, len(every) - 1):
            torch.testing.assert_close(states, every[index])
        else:
            assert states is None


def test_plain_labels_training_reaches_every_trainable_parameter(tiny_checkpoint, tiny_model_and_processor):
    """transformers' training convention: one step on `labels` gives every parameter that requires grad a gradient.
    In training mode without a rationale the terms of Eq. 10 that need none (L_img, the visual part of L_sym) are
    computed; the vision layers after `vision_feature_layer` and the tower's heads, which no output reaches, are
    frozen (also after `from_pretrained`), like the frozen image tokenizer."""
    _, processor = tiny_model_and_processor
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).train()
    unused = {f"model.vision_tower.{name}" for name in model.model.unused_vision_parameter_names()}
    last_layer = model.config.vision_config.num_hidden_layers - 1
    assert any(f"layers.{last_layer}." in name for name in unused) and any("post_layernorm" in n for n in unused)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen == unused | {name for name in frozen if ".image_tokenizer." in name}
    inputs = prompts(processor)
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.image_reconstruction_loss > 0 and out.alignment_visual_loss > 0
    assert out.text_reconstruction_loss == 0 and out.alignment_text_loss == 0
    out.loss.backward()
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with torch.no_grad():  # evaluation on labels stays the language-modeling loss alone (no diffusion noise)
        evaluated = model.eval()(**inputs, labels=inputs["input_ids"])
    assert evaluated.image_reconstruction_loss is None and torch.equal(evaluated.loss, evaluated.lm_loss)


def test_retain_grad_on_attentions_and_hidden_states_of_a_fresh_sequence(eager_model, tiny_model_and_processor):
    """Through the latent loop too: with autograd on, the per-layer outputs are tensors the logits depend on, so
    `retain_grad()` sees their gradient; values and parameter gradients are those of the plain forward."""
    _, processor = tiny_model_and_processor
    inputs = prompts(processor)
    with torch.no_grad():
        reference = eager_model(**inputs, output_attentions=True, output_hidden_states=True)
    eager_model.zero_grad(set_to_none=True)  # (the module's model: earlier tests may have left gradients)
    out = eager_model(**inputs, output_attentions=True, output_hidden_states=True)
    first_hidden, first_attention, last_hidden = out.hidden_states[0], out.attentions[0], out.hidden_states[-1]
    for tensor in (first_hidden, first_attention, last_hidden):
        tensor.retain_grad()
    out.logits[:, -1].sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (first_hidden, first_attention, last_hidden))
    real = inputs["attention_mask"].bool()  # padding positions attend to nothing; their outputs are arbitrary
    torch.testing.assert_close(out.logits[real], reference.logits[real], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(out.hidden_states, reference.hidden_states):
        torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(out.attentions, reference.attentions):  # [batch, heads, query, key]
        torch.testing.assert_close(ours.transpose(1, 2)[real], theirs.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)
    with_outputs = {name: p.grad.clone() for name, p in eager_model.named_parameters() if p.grad is not None}
    eager_model.zero_grad(set_to_none=True)
    eager_model(**inputs).logits[:, -1].sum().backward()
    plain = {name: p.grad.clone() for name, p in eager_model.named_parameters() if p.grad is not None}
    eager_model.zero_grad(set_to_none=True)
    assert plain.keys() == with_outputs.keys()
    for name, gradient in plain.items():
        scale = float(gradient.abs().max())  # float noise of a sum over many positions is relative to the largest
        torch.testing.assert_close(with_outputs[name], gradient, rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=name)
