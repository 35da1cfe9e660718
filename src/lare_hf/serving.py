"""Split serving (not in the paper): LaRe's latent phase runs in transformers, the decoding in any engine that takes
a prompt as input embeddings (vLLM's `enable_prompt_embeds`), which serves the bare language model written by
`export_language_model`.

The latent phase (prefill and the K refocusing steps, Eq. 1-5) needs the attention maps of the prompt and a model
call between the steps, which no paged-attention engine gives; what decoding needs afterwards is only the finished
sequence of input embeddings (prompt tokens, image features, the K*m latents, `<|latent_end|>`). Causal attention
over the same embeddings at the same positions gives the same keys and values, so a plain causal LM fed that
sequence continues exactly as `LaReForConditionalGeneration.generate` does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from .destinations import check_lare_checkpoint, refuse_non_empty, staged_write
from .modeling.latent_region import halting_latent_steps


@torch.no_grad()
def latent_phase_embeds(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    num_latent_steps: int | None = None,
    latent_halting: str | None = None,
    latent_halting_threshold: float | None = None,
) -> list[torch.Tensor]:
    """Per prompt of a (left-padded) batch, the input embeddings `[length_i, hidden]` after the latent phase.

    The prompts are prepared as `generate()` prepares them (`set_latent_steps`: the region rewritten to K x m slots,
    removed from text-only prompts), then one forward pass runs the latent loop; each row is the token embeddings
    with the image features in the `<|image|>` positions and its latents in its slots, without padding. Under
    adaptive halting (`latent_halting`, Table 4; the cap is `num_latent_steps`, else `max_latent_steps`, as in
    `generate()`) a sample's unused slots are dropped, so its sequence is the one a run
    with K = its step count has. Feed each to a causal LM with positions 0..length_i-1 (left padding and an attention
    mask when batched).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    num_latent_steps = halting_latent_steps(num_latent_steps, latent_halting, model.config)
    input_ids, attention_mask = model.set_latent_steps(input_ids, attention_mask, num_latent_steps)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        latent_halting=latent_halting,
        latent_halting_threshold=latent_halting_threshold,
        use_cache=False,
        logits_to_keep=1,
    )
    # the vision tower's output of the call above (`image_outputs`), not a second pass through it
    embeds, _, _ = model.model.embed_multimodal(input_ids, pixel_values, image_outputs=outputs.image_outputs)
    # Halting masks the unused slots of a halted sample out of its attention mask: the kept positions are its tokens.
    keep = outputs.halted_attention_mask if outputs.halted_attention_mask is not None else attention_mask
    config = model.config
    sequences = []
    for row in range(input_ids.shape[0]):
        row_embeds = embeds[row]
        if outputs.latent_embeds is not None and bool(outputs.latent_rows[row]):
            latents = outputs.latent_embeds[row].reshape(-1, row_embeds.shape[-1]).to(row_embeds.dtype)
            start = int((input_ids[row] == config.latent_start_token_id).nonzero()[0]) + 1
            row_embeds = row_embeds.clone()
            row_embeds[start : start + latents.shape[0]] = latents
        sequences.append(row_embeds[keep[row].bool()])
    return sequences


def chat_prompt_embeds(
    model,
    processor,
    conversations: list[list[dict]],
    num_latent_steps: int | None = None,
    latent_halting: str | None = None,
    latent_halting_threshold: float | None = None,
) -> list[torch.Tensor]:
    """`latent_phase_embeds` for a batch of chats (each a list of messages, images and text-only mixed): the prompts
    are rendered with the chat template and the processor's K (`num_latent_steps` rewrites it, as in `generate`)."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError(
            f"conversations must be a non-empty list of chats (lists of messages), got {conversations!r}."
        )
    inputs = processor.apply_chat_template(
        list(conversations),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},  # left padding (the tokenizer's side), as generate() expects
    ).to(model.device)
    return latent_phase_embeds(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs.get("pixel_values"),
        num_latent_steps=num_latent_steps,
        latent_halting=latent_halting,
        latent_halting_threshold=latent_halting_threshold,
    )


def pad_prompt_embeds(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad per-prompt embeddings into `inputs_embeds [batch, length, hidden]` and its `attention_mask`, the
    layout `generate(inputs_embeds=...)` of a causal LM expects for a batch."""
    length = max(sequence.shape[0] for sequence in sequences)
    first = sequences[0]
    inputs_embeds = first.new_zeros(len(sequences), length, first.shape[-1])
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long, device=first.device)
    for row, sequence in enumerate(sequences):
        inputs_embeds[row, length - sequence.shape[0] :] = sequence
        attention_mask[row, length - sequence.shape[0] :] = 1
    return inputs_embeds, attention_mask


def language_model_of(model) -> PreTrainedModel:
    """The bare language model of a loaded LaRe model as a causal LM of the text config's own class: the decoder
    and the LM head, with the vocabulary LaRe resized (its special tokens included), the head tied to the input
    embeddings exactly when it is in `model`, and LaRe's generation config (eos, pad, the suppressed image and latent
    tokens)."""
    decoder = model.model.language_model
    embeddings = decoder.get_input_embeddings().weight
    text_config = copy.deepcopy(model.config.text_config)
    if embeddings.shape[0] != text_config.vocab_size:
        raise ValueError(
            f"The language model's embedding table has {embeddings.shape[0]} rows but its config says vocab_size="
            f"{text_config.vocab_size}; re-save the checkpoint with `lare build` / `lare train`."
        )
    tied = model.lm_head.weight.data_ptr() == embeddings.data_ptr()
    text_config.tie_word_embeddings = tied
    text_config.architectures = None
    language_model = AutoModelForCausalLM.from_config(text_config, dtype=embeddings.dtype)
    language_model.base_model.load_state_dict(decoder.state_dict(), strict=True)
    if tied:
        language_model.tie_weights()
    else:
        language_model.get_output_embeddings().load_state_dict(model.lm_head.state_dict(), strict=True)
    language_model.generation_config = copy.deepcopy(model.generation_config)
    return language_model.to(embeddings.device).eval()


def export_language_model(
    model_dir: str | Path, output_dir: str | Path, overwrite: bool = False, trust_remote_code: bool = False
) -> Path:
    """`lare export-lm`: write the bare language model of the LaRe checkpoint `model_dir` as a plain transformers
    causal-LM checkpoint (config of its own class, weights, generation config, the tokenizer) to `output_dir`, for an
    engine that decodes from `latent_phase_embeds` (vLLM with `enable_prompt_embeds=True`)."""
    check_lare_checkpoint(model_dir, "--model")
    if Path(output_dir).expanduser().resolve() == Path(model_dir).expanduser().resolve():
        raise ValueError(
            f"--output {output_dir} is the LaRe checkpoint itself (--model); exporting there would overwrite its "
            "config and weights. Choose another folder."
        )
    output = refuse_non_empty(output_dir, "lare export-lm --output", overwrite)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto", trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    language_model = language_model_of(model)
    with staged_write(output, "the exported language model") as staging:  # a failed write keeps the old copy
        language_model.save_pretrained(staging)
        processor.tokenizer.save_pretrained(staging)
    return output


__all__ = [
    "chat_prompt_embeds",
    "export_language_model",
    "language_model_of",
    "latent_phase_embeds",
    "pad_prompt_embeds",
]
