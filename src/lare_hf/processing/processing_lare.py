"""Processor class for LaRe (Latent Refocusing).

LLaVA-style: a CLIP image processor and a fast tokenizer. On top of LLaVA's `<|image|>` expansion, the processor
writes the latent region: a prompt carries the group `<|latent_start|><|latent|><|latent_end|>` (one placeholder),
which becomes `<|latent_start|>` + K*m `<|latent|>` + `<|latent_end|>` (K = `num_latent_steps`, m =
`latent_tokens_per_step`); K = 0 removes the group (a plain LLaVA-style prompt).

This module imports only the standard library, torch and transformers: it is copied next to saved checkpoints as
Hub custom code.
"""

from __future__ import annotations

import re

import torch
from transformers import CLIPImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import MultiModalData, ProcessorMixin

try:  # build-time helpers (lare_hf installed); a Hub copy of this file loads checkpoints without them
    from lare_hf.modeling.components import add_lare_special_tokens, load_text_tokenizer, vision_image_normalization
except ImportError:  # pragma: no cover - remote-code copies only
    add_lare_special_tokens = load_text_tokenizer = vision_image_normalization = None

try:  # control tokens marked by `sanitize_control_tokens=True` are user text, not placeholders
    from transformers.processing_utils import _MARKED_RE
except ImportError:  # pragma: no cover - private name of transformers
    _MARKED_RE = None

_DEFAULT_TOKENS = {
    "image_token": "<|image|>",
    "latent_start_token": "<|latent_start|>",
    "latent_token": "<|latent|>",
    "latent_end_token": "<|latent_end|>",
}
END_OF_TURN_TOKEN = "<|im_end|>"

# CLIP's normalisation (openai/clip-vit-large-patch14).
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# ChatML, as Qwen2.5-Instruct (no default system message). Content is a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts; an image part renders `<|image|>`. The generation prompt
# ends with the (unexpanded) latent group, which the processor expands to K*m latent slots.
LARE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n<|latent_start|><|latent|><|latent_end|>' -}}"
    "{%- endif -%}"
)


class LaReProcessor(ProcessorMixin):
    r"""
    Constructs a LaRe processor: a CLIP image processor (PIL backend) and a fast tokenizer in one processor.

    Args:
        image_processor (`CLIPImageProcessorPil`): turns images into `pixel_values`.
        tokenizer (`PreTrainedTokenizerFast`): a tokenizer that has the LaRe special tokens (see
            `lare_hf.processing.tokenization.add_lare_special_tokens`). Its `padding_side` is set to "left".
        chat_template (`str`, *optional*): Jinja chat template; defaults to `LARE_CHAT_TEMPLATE` (ChatML).
        num_latent_steps (`int`, defaults to 4): K, refocusing steps written into a prompt's latent region (a call
            argument overrides it).
        latent_tokens_per_step (`int`, defaults to 4): m, latent slots per step.
        image_seq_length (`int`, defaults to 256): `<|image|>` copies per image (the number of patches).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_latent_steps: int = 4,
        latent_tokens_per_step: int = 4,
        image_seq_length: int = 256,
        **kwargs,
    ):
        _check_num_latent_steps(num_latent_steps)
        if not isinstance(latent_tokens_per_step, int) or latent_tokens_per_step < 1:
            raise ValueError(f"latent_tokens_per_step must be an integer >= 1, got {latent_tokens_per_step!r}.")
        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be an integer >= 1, got {image_seq_length!r}.")
        self.num_latent_steps = num_latent_steps
        self.latent_tokens_per_step = latent_tokens_per_step
        self.image_seq_length = image_seq_length
        if tokenizer is not None:
            for name, default in _DEFAULT_TOKENS.items():
                token = str(getattr(tokenizer, name, None) or default)
                token_id = tokenizer.convert_tokens_to_ids(token)
                if (
                    token_id is None
                    or token_id == tokenizer.unk_token_id
                    or tokenizer.encode(token, add_special_tokens=False) != [token_id]
                ):
                    raise ValueError(
                        f"The tokenizer has no special token {token!r}. Add the LaRe tokens first with "
                        "`lare_hf.processing.tokenization.add_lare_special_tokens(tokenizer)`."
                    )
                setattr(self, name, token)
                setattr(self, f"{name}_id", token_id)
            # Batched prompts must be left-padded so that generation continues every row at the last column.
            tokenizer.padding_side = "left"
        if chat_template is None:
            chat_template = LARE_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_components(
        cls,
        vision,
        text,
        tokenizer=None,
        num_latent_steps: int = 4,
        latent_tokens_per_step: int = 4,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
    ) -> LaReProcessor:
        """The processor for a model assembled with `LaReForConditionalGeneration.from_components(vision, text)`.

        Adds the LaRe special tokens to the LM's tokenizer (loaded from `text`: a folder, Hub id or GGUF file,
        unless `tokenizer` is given), takes the image size and patch grid from the vision encoder's config and its
        normalisation from its `preprocessor_config.json` (unless `image_mean` / `image_std` are given). Pass the
        same `num_latent_steps` / `latent_tokens_per_step` as to the model.
        """
        if add_lare_special_tokens is None:
            raise ImportError("LaReProcessor.from_components needs the lare_hf package (pip install lare-hf).")
        from transformers import AutoConfig, PreTrainedModel

        if isinstance(vision, PreTrainedModel):
            vision_config = vision.config
        else:
            loaded = AutoConfig.from_pretrained(vision)
            vision_config = getattr(loaded, "vision_config", loaded)
            if image_mean is None and image_std is None:
                normalization = vision_image_normalization(vision)
                image_mean, image_std = normalization["image_mean"], normalization["image_std"]
        if tokenizer is None:
            if isinstance(text, PreTrainedModel):
                raise ValueError(
                    "LaReProcessor.from_components(text=<a loaded model>) cannot find the LM's tokenizer: pass "
                    "tokenizer=... or text as a folder / Hub id / GGUF file."
                )
            tokenizer = load_text_tokenizer(text)
        add_lare_special_tokens(tokenizer)
        grid = vision_config.image_size // vision_config.patch_size
        return build_processor(
            tokenizer,
            image_size=vision_config.image_size,
            image_seq_length=grid * grid,
            num_latent_steps=num_latent_steps,
            latent_tokens_per_step=latent_tokens_per_step,
            image_mean=image_mean,
            image_std=image_std,
        )

    # ------------------------------------------------------------------ latent region
    @property
    def latent_placeholder(self) -> str:
        """The unexpanded latent group a prompt carries: `<|latent_start|><|latent|><|latent_end|>`."""
        return self.latent_start_token + self.latent_token + self.latent_end_token

    def num_latent_slots(self, num_latent_steps: int | None = None) -> int:
        """K*m: the number of `<|latent|>` slots written for `num_latent_steps` (default: the processor's K)."""
        steps = self.num_latent_steps if num_latent_steps is None else num_latent_steps
        _check_num_latent_steps(steps)
        return steps * self.latent_tokens_per_step

    def expand_latent_slots(self, text: str, num_latent_steps: int | None = None) -> str:
        """Expand every exact `<|latent_start|><|latent|><|latent_end|>` group of `text` to K*m slots (K = 0:
        remove the group). Already expanded regions are not touched."""
        slots = self.num_latent_slots(num_latent_steps)
        replacement = self.latent_start_token + self.latent_token * slots + self.latent_end_token if slots else ""
        return text.replace(self.latent_placeholder, replacement)

    # ------------------------------------------------------------------ calling
    def __call__(self, images=None, text=None, num_latent_steps: int | None = None, **kwargs) -> BatchFeature:
        """Tokenize `text` (expanding `<|image|>` to `image_seq_length` copies and the latent group to K*m slots)
        and preprocess `images`. Returns a `BatchFeature` with `input_ids`, `attention_mask` (left padding, padded to
        the longest prompt by default) and `pixel_values`.

        Args:
            images: one image, a list of images, or one list of images per prompt; `<|image|>` placeholders in the
                text are matched to them in order.
            text: a prompt or a list of prompts.
            num_latent_steps: K for this call (default: `self.num_latent_steps`).
            kwargs: tokenizer / image processor kwargs (`return_tensors`, `padding`, `truncation`, ...).
        """
        steps = self.num_latent_steps if num_latent_steps is None else num_latent_steps
        _check_num_latent_steps(steps)
        expanded = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(sample, str) for sample in texts):
                raise ValueError(
                    "`text` must be a string or a list of strings (pre-tokenized input is not supported)."
                )
            expanded = [self.expand_latent_slots(sample, steps) for sample in texts]
        if "padding" not in kwargs and "padding" not in (kwargs.get("text_kwargs") or {}):
            kwargs["padding"] = True  # batches of prompts are left-padded to the longest one by default
        outputs = super().__call__(images=images, text=expanded, **kwargs)
        if expanded is not None and "input_ids" in outputs:
            self._check_latent_slots(expanded, outputs["input_ids"])
        return outputs

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Checks that the `<|image|>` placeholders in the text match the images given (before the library's own
        checks), with a message that says how to fix it."""
        if text is not None and getattr(self, "image_token", None) is not None:
            texts = [text] if isinstance(text, str) else text
            if isinstance(texts, list) and all(isinstance(sample, str) for sample in texts):
                per_prompt = [sample.count(self.image_token) for sample in texts]
                num_images = 0 if images is None else len(make_flat_list_of_images(images))
                if sum(per_prompt) != num_images:
                    raise ValueError(
                        f"The text has {sum(per_prompt)} {self.image_token} placeholder(s) (per prompt: {per_prompt}) "
                        f"but {num_images} image(s) were given. Write {self.image_token} exactly once per image, where "
                        "the image goes (the chat template does this for each {'type': 'image'} part), and pass the "
                        "same number of images."
                    )
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    def _check_latent_slots(self, texts: list[str], input_ids) -> None:
        rows = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        expected = [len(re.findall(re.escape(self.latent_token), sample)) for sample in texts]
        found = [list(row).count(self.latent_token_id) for row in rows]
        if expected != found:
            raise ValueError(
                f"Mismatch in the number of {self.latent_token} slots between text ({expected}) and input_ids "
                f"({found}), likely due to truncation. Disable truncation or increase `max_length`."
            )

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.image_seq_length] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # ------------------------------------------------------------------ training
    def build_training_inputs(
        self,
        prompts: list,
        answers: list[str],
        images=None,
        rationales: list[str] | None = None,
        num_latent_steps: int | None = None,
        max_answer_length: int | None = None,
        max_rationale_length: int | None = None,
    ) -> BatchFeature:
        """Teacher-forcing batch: `[left pad][prompt incl. latent region][answer + <|im_end|>][right pad]`.

        The prompt part is left-padded to the longest prompt, so the latent slots sit at the same columns in every
        row and every answer starts at the same column; the answer part is right-padded to the longest answer.

        Args:
            prompts: per sample, a prompt string in chat format ending with the latent group (as the chat template
                with `add_generation_prompt=True` writes it), or a list of chat messages (the template is applied).
            answers: per sample, the answer text; tokenized as `answer + "<|im_end|>"` without other special tokens.
            images: per sample, an image, a list of images or None (matched to the sample's `<|image|>`
                placeholders); or a flat list of all images in order. Default: the images inside chat messages.
            rationales: per sample, the explicit rationale text (tokenized plain, right-padded).
            num_latent_steps: K (default: `self.num_latent_steps`); 0 gives prompts without a latent region.
            max_answer_length: keep at most this many answer tokens, counting the closing `<|im_end|>` (a truncated
                answer loses its `<|im_end|>`, so the model is never taught to stop early).
            max_rationale_length: truncate rationales to this many tokens.

        Returns:
            `BatchFeature` of torch tensors: `input_ids`, `attention_mask` (0 on all pads), `labels` (-100 except on
            answer tokens incl. `<|im_end|>`), `pixel_values` when there are images, and
            `rationale_input_ids` / `rationale_attention_mask` when `rationales` are given.
        """
        steps = self.num_latent_steps if num_latent_steps is None else num_latent_steps
        _check_num_latent_steps(steps)
        prompts, answers = list(prompts), list(answers)
        if len(prompts) != len(answers):
            raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers; give one answer per prompt.")
        if not prompts:
            raise ValueError("`prompts` is empty.")
        if rationales is not None:
            rationales = list(rationales)
            if len(rationales) != len(prompts):
                raise ValueError(
                    f"Got {len(prompts)} prompts but {len(rationales)} rationales; give one rationale per prompt "
                    "(or rationales=None)."
                )
            for index, rationale in enumerate(rationales):
                if not isinstance(rationale, str) or not rationale.strip():
                    raise ValueError(
                        f"Rationale {index} is {rationale!r}; when `rationales` is given every sample needs a "
                        "non-empty rationale."
                    )
        for index, answer in enumerate(answers):
            if not isinstance(answer, str):
                raise ValueError(f"Answer {index} must be a string, got {type(answer).__name__}.")
        for name, value in (("max_answer_length", max_answer_length), ("max_rationale_length", max_rationale_length)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")

        # Prompts -> strings in chat format; images collected from chat messages when not given.
        texts, message_images = [], []
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                texts.append(prompt)
                message_images.append([])
            elif isinstance(prompt, (list, tuple)) and all(isinstance(message, dict) for message in prompt):
                texts.append(self.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False))
                message_images.append(_images_in_messages(prompt))
            else:
                raise ValueError(f"Prompt {index} must be a string or a list of chat messages, got {type(prompt)}.")
        if images is None and any(message_images):
            images = message_images
        flat_images = self._images_per_prompt(texts, images)

        expanded = [self.expand_latent_slots(text, steps) for text in texts]
        if steps > 0:
            for index, text in enumerate(expanded):
                if not text.endswith(self.latent_end_token):
                    raise ValueError(
                        f"Prompt {index} does not end with the latent region: it must end with "
                        f"{self.latent_placeholder!r} (the chat template with add_generation_prompt=True writes it), "
                        "so that the answer follows the latent tokens."
                    )

        prompt_inputs = self(
            images=flat_images or None,
            text=expanded,
            num_latent_steps=steps,
            padding="longest",
            padding_side="left",
            return_tensors="pt",
        )
        prompt_ids, prompt_mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]

        answer_ids = [
            self.tokenizer.encode(answer + END_OF_TURN_TOKEN, add_special_tokens=False) for answer in answers
        ]
        if max_answer_length is not None:
            answer_ids = [ids[:max_answer_length] for ids in answer_ids]
        answer_length = max(len(ids) for ids in answer_ids)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        batch = len(prompts)
        answer_tensor = torch.full((batch, answer_length), pad_id, dtype=prompt_ids.dtype)
        answer_mask = torch.zeros((batch, answer_length), dtype=prompt_mask.dtype)
        for row, ids in enumerate(answer_ids):
            answer_tensor[row, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
            answer_mask[row, : len(ids)] = 1

        input_ids = torch.cat([prompt_ids, answer_tensor], dim=1)
        attention_mask = torch.cat([prompt_mask, answer_mask], dim=1)
        labels = torch.full_like(input_ids, -100)
        answer_labels = answer_tensor.masked_fill(answer_mask == 0, -100)
        labels[:, prompt_ids.shape[1] :] = answer_labels

        data = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "pixel_values" in prompt_inputs:
            data["pixel_values"] = prompt_inputs["pixel_values"]
        if rationales is not None:
            # Truncate by slicing the right-padded tensors: asking the tokenizer to truncate would leave its
            # truncation setting in the fast backend, and a checkpoint saved after training would carry it.
            rationale_inputs = self.tokenizer(
                rationales, add_special_tokens=False, padding="longest", padding_side="right", return_tensors="pt"
            )
            width = rationale_inputs["input_ids"].shape[1] if max_rationale_length is None else max_rationale_length
            data["rationale_input_ids"] = rationale_inputs["input_ids"][:, :width]
            data["rationale_attention_mask"] = rationale_inputs["attention_mask"][:, :width]
        return BatchFeature(data)

    def _images_per_prompt(self, texts: list[str], images) -> list:
        """Flatten `images` (per prompt, or a flat list) and check them against each prompt's placeholders."""
        per_prompt = [text.count(self.image_token) for text in texts]
        if images is None:
            if sum(per_prompt):
                raise ValueError(
                    f"The prompts have {self.image_token} placeholders (per prompt: {per_prompt}) but no images were "
                    "given; pass `images`."
                )
            return []
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == len(texts):  # one entry (image, list of images or None) per prompt
            rows = [
                [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
                for entry in images
            ]
            for index, (row, expected) in enumerate(zip(rows, per_prompt)):
                if len(row) != expected:
                    raise ValueError(
                        f"Prompt {index} has {expected} {self.image_token} placeholder(s) but {len(row)} image(s) "
                        f"were given for it. Write {self.image_token} once per image of the sample."
                    )
            return [image for row in rows for image in row]
        flat = [image for image in images if image is not None]
        if len(flat) != sum(per_prompt):
            raise ValueError(
                f"The prompts have {sum(per_prompt)} {self.image_token} placeholder(s) (per prompt: {per_prompt}) "
                f"but {len(flat)} image(s) were given. Give one image per placeholder, in order, or one entry per "
                "prompt."
            )
        return flat


def _check_num_latent_steps(num_latent_steps) -> None:
    if isinstance(num_latent_steps, bool) or not isinstance(num_latent_steps, int):
        raise ValueError(f"num_latent_steps must be an integer >= 0, got {num_latent_steps!r}.")
    if num_latent_steps < 0:
        raise ValueError(
            f"num_latent_steps must be >= 0, got {num_latent_steps}; use 0 for no latent region (plain LLaVA-style "
            "prompt)."
        )


def _images_in_messages(messages) -> list:
    images = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    images.extend(part[key] for key in ("image", "url", "path", "base64") if key in part)
    return images


def build_processor(
    tokenizer,
    image_size: int,
    image_seq_length: int,
    num_latent_steps: int,
    latent_tokens_per_step: int,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> LaReProcessor:
    """A `LaReProcessor` with a CLIP-style image processor (PIL backend): resize the shortest edge to `image_size`,
    center-crop `image_size` x `image_size`, rescale to [0, 1], normalise (CLIP mean/std by default)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=list(image_mean or CLIP_IMAGE_MEAN),
        image_std=list(image_std or CLIP_IMAGE_STD),
    )
    return LaReProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=LARE_CHAT_TEMPLATE,
        num_latent_steps=num_latent_steps,
        latent_tokens_per_step=latent_tokens_per_step,
        image_seq_length=image_seq_length,
    )


__all__ = ["LARE_CHAT_TEMPLATE", "LaReProcessor", "build_processor"]
