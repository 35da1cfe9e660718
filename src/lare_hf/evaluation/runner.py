"""`lare eval`: batched generation on a benchmark, scoring, a JSON report and per-sample predictions."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..destinations import check_lare_checkpoint
from ..modeling.model_card import write_model_card
from .benchmarks import BenchmarkSample, get_benchmark


def chat_messages(sample: BenchmarkSample) -> list[dict]:
    """The sample as one user turn: its image, then its benchmark prompt."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}]


def prompt_inputs(
    model, processor, samples: list[BenchmarkSample], num_latent_steps: int | None
) -> dict[str, torch.Tensor]:
    """Processor inputs (left-padded) of the samples' generation prompts with K latent steps (None: the processor's
    default), on the model's device: what generation, the analyses and the reproduction feed the model."""
    prompts = [
        processor.apply_chat_template(chat_messages(s), add_generation_prompt=True, num_latent_steps=num_latent_steps)
        for s in samples
    ]
    inputs = processor(text=prompts, images=[s.image for s in samples], padding=True, return_tensors="pt")
    return inputs.to(model.device)


def count_new_tokens(new_tokens: torch.Tensor, eos_token_ids: set[int], pad_token_id: int | None) -> list[int]:
    """Generated tokens per row, up to and including the first end-of-sequence token (padding after it excluded)."""
    counts = []
    for row in new_tokens.tolist():
        count = 0
        for token in row:
            if token == pad_token_id and token not in eos_token_ids:
                break
            count += 1
            if token in eos_token_ids:
                break
        counts.append(count)
    return counts


@torch.no_grad()
def generate_batched(
    model,
    processor,
    samples: list[BenchmarkSample],
    num_latent_steps: int | None,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Greedy answers for `samples` in batches; `generate_kwargs` go to `model.generate` (e.g. `latent_halting`).

    Returns ``{"texts", "counts"`` (generated tokens per sample), ``"latent_steps"`` (per sample: the steps it used;
    K for every sample; with adaptive halting the step it stopped at, `num_latent_steps` being the cap)
    ``, "seconds"}``."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad_id = model.generation_config.pad_token_id
    fixed_steps = processor.num_latent_steps if num_latent_steps is None else num_latent_steps
    texts, counts, latent_steps = [], [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(samples), batch_size), desc="generating", disable=not progress):
        batch = samples[start : start + batch_size]
        inputs = prompt_inputs(model, processor, batch, num_latent_steps)
        output = model.generate(
            **inputs,
            num_latent_steps=num_latent_steps,  # with adaptive halting: the cap (None: max_latent_steps)
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        texts += processor.batch_decode(new_tokens, skip_special_tokens=True)
        counts += count_new_tokens(new_tokens, eos_ids, pad_id)
        steps = output.get("latent_steps")
        latent_steps += steps.tolist() if steps is not None else [fixed_steps] * len(batch)
    return {
        "texts": [text.strip() for text in texts],
        "counts": counts,
        "latent_steps": latent_steps,
        "seconds": time.perf_counter() - started,
    }


@torch.no_grad()
def refocus_record(
    model,
    processor,
    samples: list[BenchmarkSample],
    num_latent_steps: int,
    batch_size: int = 16,
    return_extractor_attention: bool = False,
) -> dict[str, torch.Tensor]:
    """The latent phase of each sample's prompt (what `generate()` runs before its first token): saliency maps
    `[N, K, grid, grid]` and window positions `[N, K, 2]` (on the CPU), latents `[N, K, m, D]` and the pixel values
    (on the model's device). The figures, the window-hit rates and the reproduction read it. With
    `return_extractor_attention` also the Extractor's last cross-attention over each window, `extractor_attentions`
    `[N, K, m, window tokens]` on the CPU (absent when the Extractor is ablated)."""
    found: dict[str, list[torch.Tensor]] = defaultdict(list)
    for start in range(0, len(samples), batch_size):
        inputs = prompt_inputs(model, processor, samples[start : start + batch_size], num_latent_steps)
        outputs = model(**inputs, return_extractor_attention=return_extractor_attention)
        if outputs.extractor_attentions is not None:
            found["extractor_attentions"].append(outputs.extractor_attentions.float().cpu())
        found["saliency_maps"].append(outputs.saliency_maps.float().cpu())
        found["window_positions"].append(outputs.window_positions.cpu())
        found["latent_embeds"].append(outputs.latent_embeds)
        found["pixel_values"].append(inputs["pixel_values"])
    return {name: torch.cat(values) for name, values in found.items()}


def generate_answer(
    model_dir: str,
    image: Image.Image,
    prompt: str,
    num_latent_steps: int | None = None,
    max_new_tokens: int = 32,
) -> str:
    """`lare generate`: load a checkpoint with the Auto classes, chat once, return the decoded answer."""
    import lare_hf  # noqa: F401  (registers the "lare" Auto classes)

    check_lare_checkpoint(model_dir, "--model")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    if num_latent_steps is not None:
        # The model rewrites the latent region the same way inside generate(); the answer starts after it.
        input_ids, attention_mask = model.set_latent_steps(input_ids, attention_mask, num_latent_steps)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=inputs["pixel_values"],
            max_new_tokens=max_new_tokens,
        )
    return processor.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)[0].strip()


def generate_answers(
    model,
    processor,
    samples: list[BenchmarkSample],
    num_latent_steps: int | None,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
) -> tuple[list[str], list[int], float]:
    """Greedy answers for `samples` in batches; returns texts, generated-token counts and seconds spent."""
    result = generate_batched(model, processor, samples, num_latent_steps, batch_size, max_new_tokens, progress)
    return result["texts"], result["counts"], result["seconds"]


def evaluate(
    model_dir: str,
    benchmark: str,
    data: str,
    num_latent_steps: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    split: str | None = None,
    image_folder: str | None = None,
    limit: int | None = None,
    output_dir: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a benchmark file; writes `eval_<benchmark>.json` (the report) and
    `predictions_<benchmark>.jsonl` into `output_dir` (default: the checkpoint folder) and returns the report."""
    bench = get_benchmark(benchmark)
    samples = bench.load(data, split=split, image_folder=image_folder, limit=limit)
    if not samples:
        raise ValueError(f"{data} holds no {bench.name} sample to evaluate.")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    if device is not None:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    steps = processor.num_latent_steps if num_latent_steps is None else num_latent_steps
    texts, counts, seconds = generate_answers(
        model, processor, samples, steps, batch_size, max_new_tokens or bench.max_new_tokens, progress
    )
    rows = bench.judge(samples, texts)
    report = bench.score(samples, texts)
    correct_counts = [count for count, row in zip(counts, rows) if row["correct"]]
    report.update(
        {
            "model": str(model_dir),
            "data": str(data),
            "num_latent_steps": steps,
            "avg_tokens": sum(counts) / len(counts),
            "avg_tokens_correct": sum(correct_counts) / len(correct_counts) if correct_counts else None,
            "total_seconds": seconds,
            "latency_s_per_sample": seconds / len(samples),
            "batch_size": batch_size,
        }
    )
    output = Path(output_dir or model_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"eval_{bench.name}.json").write_text(json.dumps(report, indent=2))
    with open(output / f"predictions_{bench.name}.jsonl", "w") as handle:
        for row, count, sample in zip(rows, counts, samples):
            handle.write(json.dumps({**row, "num_tokens": count, "prompt": sample.prompt}) + "\n")
    if (output / "config.json").is_file():  # next to the checkpoint: its card's evaluation table gains the row
        write_model_card(output)
    return report


__all__ = [
    "chat_messages",
    "count_new_tokens",
    "evaluate",
    "generate_answer",
    "generate_answers",
    "generate_batched",
    "prompt_inputs",
    "refocus_record",
]
