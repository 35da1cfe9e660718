"""LaRe as an lmms-eval model (its "simple" model API), so that lmms-eval's own command runs on a LaRe checkpoint:

    pip install -e ".[lmms]" -c constraints/lmms.txt        # keeps the pinned torch
    python -m lmms_eval --model lare --model_args pretrained=path/to/checkpoint,num_latent_steps=4 \
        --tasks mmbench_en_dev,mmstar,pope --batch_size 8 --device cuda --output_path logs/

The name "lare" reaches lmms-eval's model registry (v2) through the `lmms_eval.models` entry point that lare-hf's
package metadata declares (`lare_hf.evaluation.lmms_eval_plugin`). The batch size comes from lmms-eval's own `--batch_size`
flag, K (`num_latent_steps`) from `--model_args` (default: the checkpoint processor's K).
"""

from __future__ import annotations

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from transformers import AutoModelForImageTextToText, AutoProcessor

import lare_hf  # noqa: F401  (registers the Auto classes)

from .runner import count_new_tokens

DEFAULT_MAX_NEW_TOKENS = 128


def _cut_at_stop_strings(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


class LaReLMMS(lmms):
    """`generate_until` with LaRe's latent refocusing; at most one image per request (the paper's setting).

    Args:
        pretrained: a LaRe checkpoint folder or Hub id.
        num_latent_steps: K for every answer (default: the checkpoint processor's K; 0 = no latent step).
        batch_size: requests per `generate()` call (lmms-eval passes its `--batch_size`).
        device: "cpu", "cuda", "cuda:1", ... (lmms-eval passes its `--device`; default: cuda when available).
        dtype: "auto", "float32", "bfloat16" or "float16".
        trust_remote_code: load the checkpoint's own code instead of the installed lare_hf.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        num_latent_steps: int | str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool | str = False,
        max_batch_size: int | None = None,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise ValueError(
                f"Unknown --model_args for the LaRe model: {sorted(kwargs)}. Accepted: pretrained, num_latent_steps, "
                "dtype, trust_remote_code (batch size and device come from lmms-eval's --batch_size / --device)."
            )
        if str(batch_size).startswith("auto"):
            raise ValueError(
                "--batch_size auto is not supported by the LaRe model; pass a number, e.g. --batch_size 8."
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        trust = str(trust_remote_code).lower() in ("1", "true", "yes")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self._device = torch.device(device)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(pretrained, dtype=torch_dtype, trust_remote_code=trust)
            .to(self._device)
            .eval()
        )
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust)
        self.num_latent_steps = None if num_latent_steps in (None, "", "None") else int(num_latent_steps)
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size!r}.")
        self.generated_tokens: list[int] = []

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _generate(self, requests: list[Instance], with_image: bool) -> list[str]:
        prompts, images, max_new_tokens, stops = [], [], DEFAULT_MAX_NEW_TOKENS, []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            content = [{"type": "image"}] if with_image else []
            messages = [{"role": "user", "content": content + [{"type": "text", "text": context}]}]
            prompts.append(
                self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, num_latent_steps=self.num_latent_steps
                )
            )
            if with_image:
                images.append(self._visuals(request)[0].convert("RGB"))
            max_new_tokens = int(gen_kwargs.get("max_new_tokens", max_new_tokens))
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
        inputs = self.processor(
            text=prompts,
            images=images or None,
            padding=True,
            return_tensors="pt",
        ).to(self._device)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.generated_tokens += count_new_tokens(new_tokens, eos_ids, self.model.generation_config.pad_token_id)
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [_cut_at_stop_strings(text, until).strip() for text, until in zip(texts, stops)]

    def _visuals(self, request: Instance) -> list:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"LaRe answers with one image per question; {task}/{doc_id} has {len(visuals)}.")
        return visuals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: dict[int, str] = {}
        with_image = [bool(self._visuals(request)) for request in requests]
        for kind in (True, False):  # a batch is all-image or all-text
            positions = [i for i, has_image in enumerate(with_image) if has_image is kind]
            for start in range(0, len(positions), self.batch_size_per_gpu):
                chunk = positions[start : start + self.batch_size_per_gpu]
                for position, text in zip(chunk, self._generate([requests[i] for i in chunk], kind)):
                    answers[position] = text
                    self.cache_hook.add_partial("generate_until", requests[position].args[:2], text)
        return [answers[i] for i in range(len(requests))]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("LaRe is evaluated by generation (generate_until tasks), as in the paper.")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("Multi-round generation is not supported by the LaRe lmms-eval model.")


__all__ = ["LaReLMMS"]
