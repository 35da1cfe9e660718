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
from transformers.image_transforms import convert_to_rgb, to_pil_image
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    is_pil_image,
    is_valid_image,
    make_flat_list_of_images,
)
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TextInput

try:  # build-time helpers (lare_hf installed); a Hub copy of this file loads checkpoints without them
    from lare_hf.modeling.builders import check_llava_config
    from lare_hf.modeling.components import add_lare_special_tokens, load_text_tokenizer, vision_image_normalization
except ImportError:  # pragma: no cover - remote-code copies only
    add_lare_special_tokens = load_text_tokenizer = vision_image_normalization = check_llava_config = None

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

CHAT_ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image")
IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")

# The template's own defaults for K and m (what `tokenizer.apply_chat_template` writes); the processor keeps them
# equal to its `num_latent_steps` / `latent_tokens_per_step`.
_LATENT_DEFAULTS = "{{%- set default_num_latent_steps = {} -%}}{{%- set default_latent_tokens_per_step = {} -%}}"
_LATENT_DEFAULTS_RE = re.compile(
    r"\{%- set default_num_latent_steps = \d+ -%\}\{%- set default_latent_tokens_per_step = \d+ -%\}"
)


def lare_chat_template(num_latent_steps: int = 4, latent_tokens_per_step: int = 4) -> str:
    """ChatML, as Qwen2.5-Instruct (no default system message), with LaRe's latent region.

    Content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts; an image part renders
    `<|image|>` (expanded to `image_seq_length` copies by the processor). The generation prompt of a conversation
    with an image ends with the latent region `<|latent_start|>` + K*m `<|latent|>` + `<|latent_end|>`, so the
    tokenizer and the processor give the same ids. K and m are the template variables `num_latent_steps` /
    `latent_tokens_per_step` (defaults: the arguments, baked into the template); K = 0 writes no region, and
    neither does a text-only conversation (the latent phase refocuses on the image; the model answers a text-only
    prompt as with K = 0). Unknown roles and content types raise.
    """
    return (
        _LATENT_DEFAULTS.format(int(num_latent_steps), int(latent_tokens_per_step))
        + "{%- set state = namespace(has_image=false) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{- raise_exception('Unknown chat role ' + message['role'] + \"; use 'system', 'user' or 'assistant'.\") -}}"
        "{%- endif -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}"
        "{{- '<|image|>' -}}"
        "{%- set state.has_image = true -%}"
        "{%- elif part['type'] == 'text' -%}"
        "{{- part['text'] -}}"
        "{%- else -%}"
        "{{- raise_exception('Unknown content type ' + part['type'] + \"; use 'text' or 'image'.\") -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- set steps = num_latent_steps if num_latent_steps is defined and num_latent_steps is not none "
        "else default_num_latent_steps -%}"
        "{%- set per_step = latent_tokens_per_step if latent_tokens_per_step is defined and latent_tokens_per_step "
        "is not none else default_latent_tokens_per_step -%}"
        "{%- if steps > 0 and state.has_image -%}"
        "{{- '<|latent_start|>' + '<|latent|>' * (steps * per_step) + '<|latent_end|>' -}}"
        "{%- endif -%}"
        "{%- endif -%}"
    )


LARE_CHAT_TEMPLATE = lare_chat_template()


def with_latent_region(
    chat_template: str,
    num_latent_steps: int = 4,
    latent_tokens_per_step: int = 4,
    latent_start_token: str = "<|latent_start|>",
    latent_token: str = "<|latent|>",
    latent_end_token: str = "<|latent_end|>",
) -> str:
    """A checkpoint's own chat template (LLaVA's, say) with LaRe's latent region added: after the generation
    prompt of a conversation with an image, `<|latent_start|>` + K*m `<|latent|>` + `<|latent_end|>`, as
    `lare_chat_template` writes it (same template variables `num_latent_steps` / `latent_tokens_per_step`, K = 0
    writes no region). The region is appended after everything the template renders, which is right after the
    generation prompt when, as in LLaVA's templates, the generation prompt is the template's last output."""
    region = (
        "{%- set lare_state = namespace(has_image=false) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is not string -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set lare_state.has_image = true -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- set steps = num_latent_steps if num_latent_steps is defined and num_latent_steps is not none "
        "else default_num_latent_steps -%}"
        "{%- set per_step = latent_tokens_per_step if latent_tokens_per_step is defined and latent_tokens_per_step "
        "is not none else default_latent_tokens_per_step -%}"
        "{%- if steps > 0 and lare_state.has_image -%}"
        f"{{{{- '{latent_start_token}' + '{latent_token}' * (steps * per_step) + '{latent_end_token}' -}}}}"
        "{%- endif -%}"
        "{%- endif -%}"
    )
    defaults = _LATENT_DEFAULTS.format(int(num_latent_steps), int(latent_tokens_per_step))
    return defaults + chat_template + region


class LaReProcessor(ProcessorMixin):
    r"""
    Constructs a LaRe processor: a CLIP image processor (PIL backend) and a fast tokenizer in one processor.

    K (`num_latent_steps`) has one convention: it is a processor attribute, saved with the processor, that sets how
    many latent steps a prompt's latent region holds. The chat template writes the region (its default K is kept
    equal to the attribute, so `tokenizer.apply_chat_template` and `processor.apply_chat_template` give the same ids);
    `apply_chat_template(..., num_latent_steps=K)` renders another K for one call, as a template variable. A
    hand-written prompt may carry the unexpanded group `<|latent_start|><|latent|><|latent_end|>`, which `__call__`
    expands to K*m slots. Another K at generation time: `model.generate(..., num_latent_steps=K)`.

    Args:
        image_processor (`CLIPImageProcessorPil`): turns images into `pixel_values`.
        tokenizer (`PreTrainedTokenizerFast`): a tokenizer that has the LaRe special tokens (see
            `lare_hf.processing.tokenization.add_lare_special_tokens`). Its `padding_side` is set to "left"; when it
            has no chat template it gets the processor's.
        chat_template (`str`, *optional*): Jinja chat template; defaults to `lare_chat_template(K, m)` (ChatML).
        num_latent_steps (`int`, defaults to 4): K, refocusing steps written into a prompt's latent region.
        latent_tokens_per_step (`int`, defaults to 4): m, latent slots per step.
        image_seq_length (`int`, defaults to 256): `<|image|>` copies per image (the number of patches).
        end_of_turn_token (`str`, *optional*): the token that closes an answer in training targets; defaults to
            ChatML's `<|im_end|>` (a converted LLaVA-1.5 uses its tokenizer's `</s>`).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_latent_steps: int = 4,
        latent_tokens_per_step: int = 4,
        image_seq_length: int = 256,
        end_of_turn_token: str | None = None,
        **kwargs,
    ):
        _check_num_latent_steps(num_latent_steps)
        if isinstance(latent_tokens_per_step, bool) or not isinstance(latent_tokens_per_step, int):
            raise ValueError(f"latent_tokens_per_step must be an integer >= 1, got {latent_tokens_per_step!r}.")
        if latent_tokens_per_step < 1:
            raise ValueError(f"latent_tokens_per_step must be an integer >= 1, got {latent_tokens_per_step!r}.")
        if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be an integer >= 1, got {image_seq_length!r}.")
        self.num_latent_steps = num_latent_steps
        self.latent_tokens_per_step = latent_tokens_per_step
        self.image_seq_length = image_seq_length
        self.end_of_turn_token = end_of_turn_token or END_OF_TURN_TOKEN
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
            chat_template = lare_chat_template(num_latent_steps, latent_tokens_per_step)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self._sync_template_defaults()
        if tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = self.chat_template

    def __setattr__(self, name: str, value) -> None:
        if name == "num_latent_steps":
            _check_num_latent_steps(value)
        super().__setattr__(name, value)
        if name in ("num_latent_steps", "latent_tokens_per_step"):
            self._sync_template_defaults()

    def _sync_template_defaults(self) -> None:
        """Keep the K and m baked into a LaRe chat template equal to the processor's (also in the tokenizer's copy
        when it is the same template), so that the tokenizer alone renders the same latent region."""
        template = self.__dict__.get("chat_template")
        if not isinstance(template, str) or not _LATENT_DEFAULTS_RE.search(template):
            return
        defaults = _LATENT_DEFAULTS.format(self.num_latent_steps, self.latent_tokens_per_step)
        updated = _LATENT_DEFAULTS_RE.sub(lambda _: defaults, template)
        if updated == template:
            return
        tokenizer = self.__dict__.get("tokenizer")
        if tokenizer is not None and getattr(tokenizer, "chat_template", None) == template:
            tokenizer.chat_template = updated
        self.__dict__["chat_template"] = updated

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

    @classmethod
    def from_llava(
        cls,
        llava,
        tokenizer=None,
        num_latent_steps: int = 4,
        latent_tokens_per_step: int = 4,
        chat_template: str | None = None,
    ) -> LaReProcessor:
        """The processor for a model converted with `LaReForConditionalGeneration.from_llava(llava)`.

        `llava`: a `LlavaProcessor` or the checkpoint's folder / Hub id. Its image processor is kept as it is
        (resolution, resize / crop, normalisation), its image token and its number of image tokens per image carry
        over, the latent tokens are added to its tokenizer (in place; or to `tokenizer`, which must be the one
        passed to the model's `from_llava`), and its chat template (or `chat_template`) gets the latent region
        (`with_latent_region`). Answers in training targets end with `<|im_end|>` when the template is ChatML, else
        with the tokenizer's end-of-sequence token. Pass the same `num_latent_steps` / `latent_tokens_per_step` as
        to the model.
        """
        if add_lare_special_tokens is None:
            raise ImportError("LaReProcessor.from_llava needs the lare_hf package (pip install lare-hf).")
        import os

        from transformers import AutoConfig, AutoProcessor, LlavaProcessor

        if isinstance(llava, (str, os.PathLike)):
            check_llava_config(AutoConfig.from_pretrained(llava), str(llava))
            llava = AutoProcessor.from_pretrained(llava)
        if not isinstance(llava, LlavaProcessor):
            raise ValueError(
                f"LaReProcessor.from_llava got a {type(llava).__name__}, not a LlavaProcessor: only plain LLaVA "
                "checkpoints convert (LLaVA-NeXT / OneVision tile an image into several crops; LaRe refocuses on "
                "one square patch grid per image)."
            )
        tokenizer = tokenizer if tokenizer is not None else llava.tokenizer
        add_lare_special_tokens(tokenizer, image_token=llava.image_token)
        template = chat_template or llava.chat_template or getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str):
            raise ValueError(
                "The LLaVA checkpoint has no chat template (processor or tokenizer); pass chat_template=... (its "
                "conversation format), to which the latent region is added."
            )
        end_of_turn = END_OF_TURN_TOKEN if END_OF_TURN_TOKEN in template else tokenizer.eos_token
        return cls(
            image_processor=llava.image_processor,
            tokenizer=tokenizer,
            chat_template=with_latent_region(template, num_latent_steps, latent_tokens_per_step),
            num_latent_steps=num_latent_steps,
            latent_tokens_per_step=latent_tokens_per_step,
            image_seq_length=_llava_image_seq_length(llava),
            end_of_turn_token=end_of_turn,
        )

    # ------------------------------------------------------------------ latent region
    @property
    def latent_placeholder(self) -> str:
        """The unexpanded latent group a hand-written prompt may carry: `<|latent_start|><|latent|><|latent_end|>`."""
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

    def set_latent_slots(self, text: str, num_latent_steps: int) -> str:
        """Rewrite every latent region of `text` (unexpanded group or K'*m slots) to `num_latent_steps` x m slots;
        K = 0 removes it. The text counterpart of `LaReForConditionalGeneration.set_latent_steps`."""
        slots = self.num_latent_slots(num_latent_steps)
        region = re.compile(
            re.escape(self.latent_start_token)
            + f"(?:{re.escape(self.latent_token)})*"
            + re.escape(self.latent_end_token)
        )
        replacement = self.latent_start_token + self.latent_token * slots + self.latent_end_token if slots else ""
        return region.sub(lambda _: replacement, text)

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """`ProcessorMixin.apply_chat_template`; with a LaRe template the messages are checked first (structure,
        roles, content types, images, empty text) and the processor's K is rendered unless `num_latent_steps=K` is
        given."""
        template = self._resolve_chat_template(chat_template)
        if isinstance(template, str) and _LATENT_DEFAULTS_RE.search(template):  # a LaRe template: its message format
            _check_conversation(conversation)
            # A string content as one text part: the same text for LaRe's template, and what a converted
            # checkpoint's template (LLaVA's selects parts by type) needs to render it at all.
            conversation = _content_as_parts(conversation)
        for name in ("num_latent_steps", "latent_tokens_per_step"):
            if isinstance(template, str) and name in template and kwargs.get(name) is None:
                kwargs[name] = getattr(self, name)
        if kwargs.get("num_latent_steps") is not None:
            _check_num_latent_steps(kwargs["num_latent_steps"])
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    # ------------------------------------------------------------------ calling
    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """Tokenize `text` (expanding `<|image|>` to `image_seq_length` copies, and an unexpanded latent group to
        K*m slots with the processor's K) and preprocess `images` (16-bit and palette images are converted to 8-bit
        RGB first). Returns a `BatchFeature` with `input_ids`, `attention_mask` and `pixel_values`; padding follows
        the tokenizer's defaults (pass `padding=True` for a batch of prompts of different lengths; the tokenizer
        pads on the left).

        Args:
            images: one image, a list of images, or one list of images per prompt; `<|image|>` placeholders in the
                text are matched to them in order.
            text: a prompt or a list of prompts.
            kwargs: tokenizer / image processor kwargs (`return_tensors`, `padding`, `truncation`, ...).
        """
        if "num_latent_steps" in kwargs:
            raise TypeError(
                "LaReProcessor.__call__ takes no num_latent_steps: K is the processor attribute `num_latent_steps`. "
                "Render another K with apply_chat_template(..., num_latent_steps=K), set processor.num_latent_steps, "
                "or pass num_latent_steps=K to model.generate()."
            )
        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not all(isinstance(sample, str) for sample in texts):
                raise ValueError(
                    f"`text` must be a string or a list of strings, got {_describe_value(text)} (pre-tokenized input "
                    "is not supported)."
                )
            if not texts:
                raise ValueError("`text` is an empty list; give at least one prompt.")
            for index, sample in enumerate(texts):
                if not sample.strip():
                    raise ValueError(
                        f"`text` entry {index} is empty ({sample!r}); give a prompt (the chat template writes one from "
                        "messages)."
                    )
            texts = [self.expand_latent_slots(sample) for sample in texts]
        return self._encode(images, texts, **kwargs)

    def _encode(self, images, texts: list[str] | None, **kwargs) -> BatchFeature:
        """Images converted to 8-bit RGB, then `ProcessorMixin.__call__`; the latent slots are checked to have
        survived tokenization (truncation would cut them)."""
        if images is not None:
            images = _convert_images(images)
        try:
            outputs = super().__call__(images=images, text=texts, **kwargs)
        except ValueError as error:
            if texts is None or len(texts) < 2 or not str(error).startswith("Unable to create tensor"):
                raise
            raise ValueError(
                f"The {len(texts)} prompts of this batch have different lengths, so they cannot be stacked into one "
                "tensor; pass padding=True (LaReProcessor pads on the left, so the latent slots share columns)."
            ) from None
        if texts is not None and "input_ids" in outputs:
            self._check_latent_slots(texts, outputs["input_ids"])
            self._check_prompt_length(outputs)
        return outputs

    def _check_prompt_length(self, outputs: BatchFeature) -> None:
        """Refuse prompts longer than the tokenizer's `model_max_length` (the tokenizer itself only warns, and the
        model would then run on positions it was never trained for)."""
        limit = getattr(self.tokenizer, "model_max_length", None)
        if not isinstance(limit, int) or limit >= 10**9:  # transformers' "no limit" value is 1e30
            return
        rows = outputs.get("attention_mask", outputs["input_ids"])
        lengths = [int(sum(row)) if "attention_mask" in outputs else len(row) for row in rows]
        if max(lengths, default=0) > limit:
            longest = max(lengths)
            raise ValueError(
                f"A prompt has {longest} tokens (text, {self.image_seq_length} per image and the latent slots) but the "
                f"model allows at most {limit} (tokenizer.model_max_length). Shorten the prompt or use fewer latent "
                "steps (num_latent_steps)."
            )

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Checks that the `<|image|>` placeholders in the text match the images given (before the library's own
        checks), with a message that says how to fix it."""
        if text is not None and getattr(self, "image_token", None) is not None:
            texts = [text] if isinstance(text, str) else text
            if isinstance(texts, list) and all(isinstance(sample, str) for sample in texts):
                per_prompt = [sample.count(self.image_token) for sample in texts]
                num_images = 0 if images is None else len(make_flat_list_of_images(images))
                for index, (sample, count) in enumerate(zip(texts, per_prompt)):
                    if count > 1 and self.latent_start_token in sample:
                        raise ValueError(
                            f"Prompt {index} has {count} images, but LaRe takes one image per prompt: its latent steps "
                            f"(the {self.latent_start_token} region) refocus on one image's patch grid. Give each "
                            "prompt one image, or render multi-image prompts without latent steps "
                            "(apply_chat_template(..., num_latent_steps=0))."
                        )
                if sum(per_prompt) != num_images:
                    raise ValueError(
                        f"The number of {self.image_token} tokens in the prompts should be the same as the number of "
                        f"images: the text has {sum(per_prompt)} {self.image_token} placeholder(s) (per prompt: "
                        f"{per_prompt}) but {num_images} image(s) were given. Write {self.image_token} exactly once per "
                        "image, where the image goes (the chat template does this for each {'type': 'image'} part), "
                        "and pass the same number of images."
                    )
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save as usual. transformers writes `auto_map` onto a custom-code processor and its image processor while
        saving (for the saved files); the instances keep the auto-class state they had, so `to_dict()` is the same
        before and after saving."""
        owners = [self] + [getattr(self, name) for name in self.get_attributes()]
        states = [(owner, "auto_map" in owner.__dict__, owner.__dict__.get("auto_map")) for owner in owners]
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            for owner, had_auto_map, auto_map in states:
                if had_auto_map:
                    owner.__dict__["auto_map"] = auto_map
                else:
                    owner.__dict__.pop("auto_map", None)

    def to_dict(self) -> dict:
        """`ProcessorMixin.to_dict`, without the `auto_map` that saving custom code writes onto built-in
        sub-processors (it names the LaRe processor, so it means nothing inside the image processor's entry)."""
        output = super().to_dict()
        for name in self.get_attributes():
            entry = output.get(name)
            if isinstance(entry, dict) and getattr(getattr(self, name, None), "_auto_class", None) is None:
                entry.pop("auto_map", None)
        return output

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
            prompts: per sample, a prompt string in chat format ending with the latent region (as the chat template
                with `add_generation_prompt=True` writes it; the region is rewritten to K steps), or a list of chat
                messages (the template is applied).
            answers: per sample, the answer text; tokenized as `answer + "<|im_end|>"` without other special tokens.
            images: per sample, an image, a list of images or None (matched to the sample's `<|image|>`
                placeholders); or a flat list of all images in order. Default: the images inside chat messages.
            rationales: per sample, the explicit rationale text (tokenized plain, right-padded), or None for a sample
                without one (its row of `rationale_attention_mask` is all 0; the model leaves it out of the losses
                that need a rationale).
            num_latent_steps: K (default: `self.num_latent_steps`); 0 gives prompts without a latent region. A
                prompt without an image never has one (the latent phase refocuses on the image): text-only samples
                are plain prompts, left-padded with the others.
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
                if rationale is not None and (not isinstance(rationale, str) or not rationale.strip()):
                    raise ValueError(
                        f"Rationale {index} is {rationale!r}; give a non-empty string, or None for a sample without "
                        "a rationale."
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
                texts.append(
                    self.apply_chat_template(
                        list(prompt), add_generation_prompt=True, tokenize=False, num_latent_steps=steps
                    )
                )
                message_images.append(_images_in_messages(prompt))
            else:
                raise ValueError(f"Prompt {index} must be a string or a list of chat messages, got {type(prompt)}.")
        if images is None and any(message_images):
            images = message_images
        flat_images = self._images_per_prompt(texts, images)

        with_image = [text.count(self.image_token) > 0 for text in texts]
        expanded = [self.set_latent_slots(text, steps if image else 0) for text, image in zip(texts, with_image)]
        if steps > 0:
            for index, text in enumerate(expanded):
                if with_image[index] and not text.endswith(self.latent_end_token):
                    raise ValueError(
                        f"Prompt {index} does not end with the latent region: it must end with "
                        f"{self.latent_placeholder!r} (the chat template with add_generation_prompt=True writes it), "
                        "so that the answer follows the latent tokens."
                    )

        prompt_inputs = self._encode(
            flat_images or None,
            expanded,
            padding="longest",
            padding_side="left",
            return_tensors="pt",
        )
        prompt_ids, prompt_mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]

        answer_ids = [
            self.tokenizer.encode(answer + self.end_of_turn_token, add_special_tokens=False) for answer in answers
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
            # Truncate by slicing the token lists: asking the tokenizer to truncate would leave its
            # truncation setting in the fast backend, and a checkpoint saved after training would carry it.
            rationale_ids = [
                [] if rationale is None else self.tokenizer.encode(rationale, add_special_tokens=False)
                for rationale in rationales
            ]
            width = max(1, max(len(ids) for ids in rationale_ids))
            if max_rationale_length is not None:
                width = min(width, max_rationale_length)
            rationale_tensor = torch.full((batch, width), pad_id, dtype=prompt_ids.dtype)
            rationale_mask = torch.zeros((batch, width), dtype=prompt_mask.dtype)
            for row, ids in enumerate(rationale_ids):
                ids = ids[:width]
                rationale_tensor[row, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
                rationale_mask[row, : len(ids)] = 1
            data["rationale_input_ids"] = rationale_tensor
            data["rationale_attention_mask"] = rationale_mask
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


def _describe_value(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _check_conversation(conversation) -> None:
    """Messages as the chat template takes them: a non-empty list of {"role", "content"} dicts (or a batch of such
    lists); roles system/user/assistant; content a string or a list of text/image parts; images as image objects or
    url/path/base64 strings; some text or an image to answer."""
    if hasattr(conversation, "messages"):
        conversation = conversation.messages
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(
            f"`conversation` must be a list of messages ({{'role': ..., 'content': ...}} dicts) or a batch of such "
            f"lists, got {_describe_value(conversation)}."
        )
    if not conversation:
        raise ValueError("`conversation` is an empty list of messages; give at least one user message.")
    batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    conversations = conversation if batched else [conversation]
    for number, messages in enumerate(conversations):
        where = f"conversation {number}, " if batched else ""
        if hasattr(messages, "messages"):
            messages = messages.messages
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(
                f"{where}messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got "
                f"{_describe_value(messages)}."
            )
        has_input = False
        for index, message in enumerate(messages):
            at = f"{where}message {index}"
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(
                    f"{at} must be a dict with 'role' and 'content', got {_describe_value(message)}; e.g. "
                    "{'role': 'user', 'content': [{'type': 'text', 'text': 'How many?'}]}."
                )
            role, content = message["role"], message["content"]
            if role not in CHAT_ROLES:
                raise ValueError(f"{at} has role {role!r}; use one of {', '.join(map(repr, CHAT_ROLES))}.")
            if isinstance(content, str):
                has_input = has_input or bool(content.strip())
                continue
            if not isinstance(content, (list, tuple)):
                raise ValueError(
                    f"{at} has content {_describe_value(content)}; give a string or a list of "
                    "{'type': 'text', 'text': ...} / {'type': 'image', 'image': ...} parts."
                )
            for part_index, part in enumerate(content):
                part_at = f"{at}, content part {part_index}"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in CONTENT_TYPES:
                    shown = repr(kind) if isinstance(part, dict) else _describe_value(part)
                    raise ValueError(
                        f"{part_at} has type {shown}; LaRe takes {' and '.join(map(repr, CONTENT_TYPES))} parts, as "
                        "{'type': 'text', 'text': ...} or {'type': 'image', 'image': ...}."
                    )
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise ValueError(
                            f"{part_at} is a text part whose 'text' is {_describe_value(part.get('text'))}; give a "
                            "string."
                        )
                    has_input = has_input or bool(part["text"].strip())
                    continue
                has_input = True
                for key in IMAGE_SOURCE_KEYS:
                    if key not in part:
                        continue
                    value = part[key]
                    valid = (
                        isinstance(value, str) if key != "image" else isinstance(value, str) or is_valid_image(value)
                    )
                    if not valid:
                        raise ValueError(
                            f"{part_at} has {key}={_describe_value(value)}, which is not an image; give a PIL image, "
                            "a numpy array or torch tensor of pixels, or a path / URL string."
                        )
        if not has_input:
            raise ValueError(
                f"{where}the messages hold no text and no image (all content is empty); give the question to answer."
            )


def _content_as_parts(conversation):
    """The conversation (or batch of conversations) with every string `content` as `[{"type": "text", ...}]`."""

    def convert(messages):
        return [
            dict(message, content=[{"type": "text", "text": message["content"]}])
            if isinstance(message.get("content"), str)
            else message
            for message in messages
        ]

    if hasattr(conversation, "messages"):
        conversation = conversation.messages
    if conversation and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")):
        return [convert(getattr(messages, "messages", messages)) for messages in conversation]
    return convert(conversation)


def _to_8bit_rgb(image):
    """A PIL image with more than 8 bits per channel scaled to 8-bit RGB (PIL's own `convert` would clip 16-bit
    values at 255, turning the image white); other modes are returned as they are (the image processor converts
    them to RGB, compositing transparency over white)."""
    mode = image.mode
    if mode.startswith("I;16"):
        image, mode = image.convert("I"), "I"
    if mode == "I":
        high = image.getextrema()[1]
        scale = 1.0 if high <= 255 else 1.0 / 257.0 if high <= 65535 else 255.0 / high
        return image.point(lambda value: value * scale).convert("L").convert("RGB")
    if mode == "F":
        high = image.getextrema()[1]
        scale = 255.0 if high <= 1.0 else 1.0 if high <= 255.0 else 255.0 / high
        return image.point(lambda value: value * scale).convert("L").convert("RGB")
    return image


def to_rgb(image):
    """A PIL image as 8-bit RGB: 16-bit and float images scaled (not clipped), palette and transparent images
    composited over white (as the image processor's `convert_rgb` does)."""
    return to_pil_image(convert_to_rgb(_to_8bit_rgb(image), return_numpy=True))  # PIL output is deprecated in 5.25


def _array_to_pil(array):
    """One image given as a numpy array or torch tensor ([H, W], [H, W, C] or [C, H, W] with C in 1, 3, 4) as an
    8-bit PIL image: bool as 0/255, uint16 scaled by 1/257, floats in [0, 1] scaled by 255 (in [0, 255] taken as
    they are), like the PIL path; anything else is refused naming `images` (the image processor's own errors do
    not say which input or how to fix it). torch only: this module is copied next to checkpoints as custom code."""
    shape = tuple(array.shape)
    dtype = str(array.dtype).removeprefix("torch.")
    if isinstance(array, torch.Tensor):  # torch implements few operations on uint16-uint64: widen them first
        pixels = array.detach().cpu()
        pixels = pixels.to(torch.int64) if dtype in ("uint16", "uint32", "uint64") else pixels
    else:
        try:
            pixels = torch.as_tensor(array.astype("int64") if dtype in ("uint16", "uint32", "uint64") else array)
        except (TypeError, RuntimeError):
            raise ValueError(f"`images` holds an array of dtype {dtype}, which is not an image's pixels.") from None
    if dtype == "uint16":
        pixels = torch.round(pixels / 257.0)
    if pixels.dim() == 3 and pixels.shape[-1] not in (1, 3, 4) and pixels.shape[0] in (1, 3, 4):
        pixels = pixels.permute(1, 2, 0)  # channels first
    if pixels.dim() == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.dim() == 3 and pixels.shape[-1] not in (3, 4):
        raise ValueError(
            f"`images` holds an array of shape {shape}: an image array is [H, W], [H, W, C] or [C, H, W] with C = 1, "
            "3 or 4 channels."
        )
    if pixels.dtype == torch.bool:
        pixels = pixels.to(torch.uint8) * 255
    elif pixels.is_floating_point():
        if not torch.isfinite(pixels).all():
            raise ValueError("`images` holds an array with NaN or infinite pixels; give finite pixel values.")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"`images` holds a float array with pixels in [{low}, {high}]; float pixels must lie in [0, 1] "
                "(or [0, 255])."
            )
        pixels = torch.round(pixels.double() * (255.0 if high <= 1.0 else 1.0))
    elif pixels.is_complex():
        raise ValueError(f"`images` holds an array of dtype {dtype}, which is not an image's pixels.")
    elif pixels.dtype != torch.uint8:
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"`images` holds a {dtype} array with pixels in [{low}, {high}]; integer pixels must lie in [0, 255] "
                "(uint8), or be uint16."
            )
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(-1).expand(*pixels.shape, 3)
    return to_pil_image(
        pixels.to(torch.uint8).contiguous().numpy(), do_rescale=False, input_data_format=ChannelDimension.LAST
    )


def _convert_images(images):
    """Check every image of `images` (nested lists allowed) and bring high-bit-depth PIL images to 8-bit RGB."""
    if isinstance(images, (list, tuple)):
        return type(images)(_convert_images(image) for image in images)
    if is_pil_image(images):
        return _to_8bit_rgb(images)
    if not is_pil_image(images) and is_valid_image(images) and len(images.shape) in (2, 3):  # numpy / torch
        return _array_to_pil(images)
    if images is None or isinstance(images, str) or is_valid_image(images):
        return images
    raise ValueError(
        f"`images` holds {_describe_value(images)}, which is not an image; give PIL images, numpy arrays or torch "
        "tensors of pixels (one per <|image|> placeholder)."
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


def _llava_image_seq_length(llava_processor) -> int:
    """The `<image>` copies a `LlavaProcessor` writes for one image (its patch grid, plus CLS with "full" on
    CLIP), counted on a blank image at the processor's own input size."""
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    ids = llava_processor(images=image, text=llava_processor.image_token, return_tensors="pt")["input_ids"]
    return int((ids == llava_processor.image_token_id).sum())


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
        chat_template=lare_chat_template(num_latent_steps, latent_tokens_per_step),
        num_latent_steps=num_latent_steps,
        latent_tokens_per_step=latent_tokens_per_step,
        image_seq_length=image_seq_length,
    )


__all__ = [
    "LARE_CHAT_TEMPLATE",
    "LaReProcessor",
    "build_processor",
    "lare_chat_template",
    "to_rgb",
    "with_latent_region",
]
