"""Latency and peak memory of LaRe generation (issue: model core, item 10).

Compares, on one small random-init config (256 image tokens, K=4, m=4) and in one run:
  * LaRe `generate()` (prefix encoded once, K steps on the KV cache, then GenerationMixin decoding),
  * the same model with `num_latent_steps=0` (a plain LLaVA-style model) for the same number of new tokens,
  * a reference that re-encodes the whole sequence at every latent step (no cache across steps), then decodes.
It also checks that the reference produces the same tokens as LaRe (the cached loop is exact).

    python benchmarks/bench_generate.py [--device cuda] [--dtype bfloat16] [--new-tokens 32] [--repeats 5]

Peak memory: CUDA max allocated on GPU; on CPU the peak resident set size of a fresh subprocess per variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from lare_hf import LaReConfig, LaReForConditionalGeneration
from lare_hf.modeling.refocus import SaliencyRecorder, record_saliency

IMAGE, START, SLOT, END = 1000, 1001, 1002, 1003


def bench_config() -> LaReConfig:
    return LaReConfig(
        vision_config=dict(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            patch_size=14, image_size=224,
        ),
        text_config=dict(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True,
        ),
        image_seq_length=256, image_token_id=IMAGE, latent_start_token_id=START, latent_token_id=SLOT,
        latent_end_token_id=END, num_latent_steps=4, latent_tokens_per_step=4, extractor_num_heads=8,
        window_size=8, window_stride=4, use_reconstructor=False,
    )  # fmt: skip


def make_inputs(batch: int, config: LaReConfig, device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(batch):
        text = torch.randint(10, 900, (8 + index,), generator=generator).tolist()
        question = torch.randint(10, 900, (12,), generator=generator).tolist()
        rows.append(text + [IMAGE] * config.image_seq_length + question + [START] + [SLOT] * 16 + [END])
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(row)) + row for row in rows], device=device)
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows], device=device)
    pixel_values = torch.randn(batch, 3, 224, 224, generator=generator).to(device, dtype)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


@torch.no_grad()
def reference_generate(model: LaReForConditionalGeneration, inputs: dict, new_tokens: int) -> torch.Tensor:
    """Re-encode the whole sequence (prompt + latents so far) for every latent step, then decode."""
    inner = model.model
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    layout = inner.latent_layout(input_ids)
    embeds, image_features, image_positions = inner.embed_multimodal(input_ids, inputs["pixel_values"])
    m = model.config.latent_tokens_per_step
    slots_start = layout.start + 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    scale = inner.embedding_scale().to(embeds.dtype)
    latents = []
    for _ in range(layout.num_steps):
        end = slots_start + len(latents) * m
        sequence = torch.cat([embeds[:, :slots_start], *latents], dim=1)
        recorder = SaliencyRecorder(
            image_positions, model.config.saliency_layers, model.config.text_config.num_hidden_layers
        )
        with record_saliency(inner.language_model, recorder):
            hidden = inner.language_model(
                inputs_embeds=sequence, attention_mask=attention_mask[:, :end], position_ids=position_ids[:, :end],
                use_cache=False, saliency_recorder=recorder,
            ).last_hidden_state  # fmt: skip
        _, window = inner._select_window(recorder.saliency(), image_features)
        history = torch.cat(latents, dim=1) if latents else None
        latents.append(inner._extract_latents(hidden[:, -1], window, history, scale, False)[0].to(embeds.dtype))
    full = torch.cat([embeds[:, :slots_start], *latents, embeds[:, slots_start + layout.num_steps * m :]], dim=1)
    output = super(LaReForConditionalGeneration, model).generate(
        inputs_embeds=full, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False,
    )  # fmt: skip
    return output[:, -new_tokens:]


def run_variant(variant: str, model, inputs: dict, new_tokens: int) -> torch.Tensor:
    if variant == "reference":
        return reference_generate(model, inputs, new_tokens)
    steps = 0 if variant == "k0" else None
    output = model.generate(
        **inputs, num_latent_steps=steps, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    return output[:, -new_tokens:]


def time_variant(variant: str, batch: int, args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = LaReForConditionalGeneration(bench_config()).to(device, dtype).eval()
    model.generation_config.eos_token_id = None
    inputs = make_inputs(batch, model.config, device, dtype)
    tokens = run_variant(variant, model, inputs, args.new_tokens)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_variant(variant, model, inputs, args.new_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "batch": batch, "seconds": statistics.median(times), "peak_mb": peak_mb,
            "tokens": tokens.tolist()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_variant(args.one[0], int(args.one[1]), args)))
        return

    results = {}
    for batch in args.batches:
        for variant in ("lare", "k0", "reference"):
            command = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype,
                       "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--one", variant, str(batch)]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[(variant, batch)] = json.loads(output.strip().splitlines()[-1])

    print(f"device={args.device} dtype={args.dtype} new_tokens={args.new_tokens} repeats={args.repeats} "
          "config: 256 image tokens, K=4, m=4, LM 8x512")  # fmt: skip
    print(f"{'batch':>5} {'variant':>10} {'latency ms':>11} {'peak MB':>9} {'vs K=0':>7}")
    for batch in args.batches:
        base = results[("k0", batch)]["seconds"]
        for variant in ("lare", "k0", "reference"):
            row = results[(variant, batch)]
            print(f"{batch:>5} {variant:>10} {row['seconds'] * 1000:>11.1f} {row['peak_mb']:>9.0f} "
                  f"{row['seconds'] / base:>6.2f}x")  # fmt: skip
        same = results[("lare", batch)]["tokens"] == results[("reference", batch)]["tokens"]
        ratio = results[("reference", batch)]["seconds"] / results[("lare", batch)]["seconds"]
        print(f"      batch {batch}: reference/LaRe = {ratio:.2f}x, reference tokens identical to LaRe: {same}")


if __name__ == "__main__":
    main()
