"""An lmms-eval model ("simple" model API) for LaRe checkpoints. Not run in this project (lmms-eval is not a
dependency and its tasks download data); written against lmms-eval's documented `lmms` interface.

Usage (with `pip install lmms-eval`):

    python -m lare_hf.evaluation.lmms_eval_adapter --model lare \
        --model_args pretrained=path/to/checkpoint,num_latent_steps=4,batch_size=8 \
        --tasks mmbench_en_dev,mmstar,mmvp,scienceqa_img,pope --batch_size 1 --output_path logs/

Importing this module registers the model name "lare" with lmms-eval; running it as a script starts lmms-eval's
command line after that registration.
"""

from __future__ import annotations

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from transformers import AutoModelForImageTextToText, AutoProcessor

import lare_hf  # noqa: F401  (registers the Auto classes)

from .runner import count_new_tokens


@register_model("lare")
class LaReLMMS(lmms):
    """`generate_until` with LaRe's latent refocusing; one image per request (the paper's setting)."""

    def __init__(
        self,
        pretrained: str,
        num_latent_steps: int | None = None,
        batch_size: int = 8,
        device: str = "cuda" if torch.cuda.is_available() else "cpu",
        dtype: str = "auto",
        **kwargs,
    ):
        super().__init__()
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.num_latent_steps = None if num_latent_steps is None else int(num_latent_steps)
        self.batch_size_per_gpu = int(batch_size)
        self.generated_tokens: list[int] = []

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            batch = requests[start : start + self.batch_size_per_gpu]
            prompts, images, max_new_tokens = [], [], 32
            for request in batch:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
                if len(visuals) != 1:
                    raise ValueError(f"LaRe evaluates one image per question; {task}/{doc_id} has {len(visuals)}.")
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}]
                prompts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
                images.append(visuals[0].convert("RGB"))
                max_new_tokens = max(max_new_tokens, int(gen_kwargs.get("max_new_tokens", 32)))
            inputs = self.processor(
                text=prompts, images=images, num_latent_steps=self.num_latent_steps, return_tensors="pt"
            ).to(self.model.device)
            with torch.no_grad():
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            eos = self.model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos])
            self.generated_tokens += count_new_tokens(new_tokens, eos_ids, self.model.generation_config.pad_token_id)
            answers += [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("LaRe is evaluated by generation (generate_until), as in the paper.")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("Multi-round generation is not supported by the LaRe adapter.")


if __name__ == "__main__":
    from lmms_eval.__main__ import cli_evaluate

    cli_evaluate()
