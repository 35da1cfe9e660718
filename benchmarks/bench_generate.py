"""Latency and peak memory of LaRe generation (issue: model core, item 10).

Compares, on one small random-init config (256 image tokens, K=4, m=4) and in one run:
  * LaRe `generate()` (prefix encoded once, K steps on the KV cache, then GenerationMixin decoding),
  * the same model with `num_latent_steps=0` (a plain LLaVA-style model) for the same number of new tokens,
  * a reference that re-encodes the whole sequence at every latent step (no cache across steps), then decodes.
It also checks that the reference produces the same tokens as LaRe (the cached loop is exact).

    python benchmarks/bench_generate.py [--device cuda] [--dtype bfloat16] [--new-tokens 32] [--repeats 5]

Peak memory: CUDA max allocated on GPU; on CPU the peak resident set size of a fresh subprocess per variant.

With `--compile` it instead measures decoding (the steps after the prefill, which runs the latent loop) for K=4 and
K=0 (batch 1 unless `--batches` says otherwise), each setting in a fresh subprocess: the default dynamic cache, a
static cache (`cache_implementation="static"`), and the static cache with the decode step compiled by
`generate()` (`compile_config`: fullgraph, `mode="default"` on CPU, transformers' default "reduce-overhead" on GPU).
It prints decode tokens/s (new tokens after the first, over the time from the prefill's logits to the last step's),
the prefill time, the first call's time (which includes compiling), the compiled / eager ratios, and whether the
three produce the same tokens.

    python benchmarks/bench_generate.py --compile [--new-tokens 32] [--repeats 5] [--batches 1]
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
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

from lare_hf import LaReConfig, LaReForConditionalGeneration
from lare_hf.modeling.refocus import SaliencyRecorder, record_saliency

IMAGE, START, SLOT, END = 1000, 1001, 1002, 1003


# The language model of the benchmarks (Qwen2-style): layers x width, and the narrower one that
# bench_train_step.py --gradient-checkpointing uses by default.
LANGUAGE_MODELS = {
    "8x512": dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2),
    "8x256": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2),
}


def bench_config(language_model: str = "8x512") -> LaReConfig:
    return LaReConfig(
        vision_config=dict(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            patch_size=14, image_size=224,
        ),
        text_config=dict(
            **LANGUAGE_MODELS[language_model], num_hidden_layers=8, vocab_size=4096, tie_word_embeddings=True,
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


class StepClock(LogitsProcessor):
    """Records when each step's logits reach the logits processors: once after the prefill, then once per decode
    step (a no-op on the scores)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


DECODE_CACHES = ("dynamic", "static", "compiled")


def decode_variant(num_latent_steps: int, cache: str, batch: int, args) -> dict:
    """One (K, cache) setting in this process: decode tokens/s and prefill time (median of the repeats after a
    first call, which for "compiled" includes compiling the decode step)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = LaReForConditionalGeneration(bench_config()).to(device, dtype).eval()
    model.generation_config.eos_token_id = None
    inputs = make_inputs(batch, model.config, device, dtype)
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    if cache != "dynamic":
        options["cache_implementation"] = "static"
    if cache == "compiled":
        compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device == "cuda" else "default")
        compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked to
        options["compile_config"] = compile_config

    def run() -> tuple[torch.Tensor, StepClock, float]:
        clock = StepClock()
        start = time.perf_counter()
        output = model.generate(
            **inputs, num_latent_steps=num_latent_steps, logits_processor=LogitsProcessorList([clock]), **options
        )
        return output[:, -args.new_tokens :], clock, start

    first_start = time.perf_counter()
    tokens, _, _ = run()
    first_call = time.perf_counter() - first_start
    if cache == "compiled" and not hasattr(model, "_compiled_call"):
        raise RuntimeError("generate() did not compile the decode step; the tokens/s would be the eager ones.")
    decode_rates, prefills = [], []
    for _ in range(args.repeats):
        _, clock, start = run()
        decode_rates.append(batch * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
        prefills.append(clock.times[0] - start)
    return {"decode_tokens_per_s": statistics.median(decode_rates), "prefill_s": statistics.median(prefills),
            "first_call_s": first_call, "tokens": tokens.tolist()}  # fmt: skip


def compare_compiled_decoding(args) -> None:
    results = {}
    for batch in args.batches:
        for steps in (4, 0):
            for cache in DECODE_CACHES:
                command = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype,
                           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                           "--one-decode", str(steps), cache, str(batch)]  # fmt: skip
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[(batch, steps, cache)] = json.loads(output.strip().splitlines()[-1])
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} new_tokens={args.new_tokens} "
          f"repeats={args.repeats} torch {torch.__version__}; config: 256 image tokens, m=4, LM 8x512; decode = the {args.new_tokens - 1} "
          "steps after the prefill (which runs the latent loop)")  # fmt: skip
    print(f"{'batch':>5} {'K':>2} {'cache':>9} {'decode tok/s':>13} {'prefill ms':>11} {'first call s':>13}")
    for batch in args.batches:
        for steps in (4, 0):
            for cache in DECODE_CACHES:
                row = results[(batch, steps, cache)]
                print(f"{batch:>5} {steps:>2} {cache:>9} {row['decode_tokens_per_s']:>13.1f} "
                      f"{row['prefill_s'] * 1000:>11.1f} {row['first_call_s']:>13.1f}")  # fmt: skip
            rate = {cache: results[(batch, steps, cache)]["decode_tokens_per_s"] for cache in DECODE_CACHES}
            same = all(results[(batch, steps, cache)]["tokens"] == results[(batch, steps, "dynamic")]["tokens"]
                       for cache in DECODE_CACHES)  # fmt: skip
            print(f"      batch {batch}, K={steps}: compiled / static eager = {rate['compiled'] / rate['static']:.2f}x, "
                  f"compiled / dynamic eager = {rate['compiled'] / rate['dynamic']:.2f}x decode tokens/s; "
                  f"tokens identical: {same}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="*", help="default: 1 8 (1 with --compile)")
    parser.add_argument("--compile", action="store_true", help="decode tokens/s with / without a compiled decode step")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--one-decode", nargs=3, metavar=("K", "CACHE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batches is None:
        args.batches = [1] if args.compile else [1, 8]
    if args.one:
        print(json.dumps(time_variant(args.one[0], int(args.one[1]), args)))
        return
    if args.one_decode:
        steps, cache, batch = args.one_decode
        print(json.dumps(decode_variant(int(steps), cache, int(batch), args)))
        return
    if args.compile:
        compare_compiled_decoding(args)
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
