"""Cost of one LaRe training step (forward + backward), in one run (issue: semantic augmentation, item 7).

Same small random-init config as bench_generate.py (256 image tokens, K=4, m=4, LM 8x512), batch of 4:
  * all losses: L_ntp + L_sym + L_img (Table 7 U-Net on 256 px window crops, KL-16 tokenizer) + L_text,
  * latent losses off: the same K=4 model, next-token loss only,
  * K=0: no latent steps (a plain LLaVA-style step).

    python benchmarks/bench_train_step.py [--device cuda] [--repeats 5] [--unet table7|tiny]

With `--gradient-checkpointing` it instead compares the all-losses K=4 step and the K=0 step with and without
gradient checkpointing (transformers' layer-wise checkpointing, through the latent loop's KV cache), each in a fresh
subprocess, and prints time and peak memory with / without. Peak memory: CUDA max allocated during the step on GPU;
on CPU the peak resident set size of the process and its rise above the resident size once the model is built
(activations and gradients: the figure checkpointing acts on). Its defaults are chosen so that the four settings
finish within 10 minutes on a shared 2-core CPU while activations dominate the rise: the LM narrowed to 8 layers x
256 (`--lm 8x256`; 256 image tokens, K=4, m=4 as above), the tiny U-Net on 64 px crops (`--unet tiny`), batch 4,
one timed step after a warm-up (`--repeats 1`).

    python benchmarks/bench_train_step.py --gradient-checkpointing [--lm 8x512] [--unet table7] [--batch 8]
        [--repeats 3] [--dtype bfloat16]
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
from bench_generate import END, IMAGE, LANGUAGE_MODELS, SLOT, START, bench_config, make_inputs

from lare_hf import LaReConfig, LaReForConditionalGeneration
from lare_hf.modeling.reconstruction import TINY_IMAGE_TOKENIZER_CONFIG, TINY_RECONSTRUCTOR_CONFIG


def training_config(unet: str, language_model: str = "8x512") -> LaReConfig:
    config = bench_config(language_model)
    config.use_reconstructor = True
    if unet == "tiny":
        config.reconstructor_config = dict(TINY_RECONSTRUCTOR_CONFIG)
        config.image_tokenizer_config = dict(TINY_IMAGE_TOKENIZER_CONFIG)
        config.reconstruction_image_size = 64
    return config


def training_batch(
    config: LaReConfig, batch: int, device: str, num_latent_steps: int, dtype: torch.dtype = torch.float32
):
    inputs = make_inputs(batch, config, device, dtype)
    input_ids = inputs["input_ids"]
    if num_latent_steps == 0:
        keep = ~torch.isin(input_ids[0], torch.tensor([START, SLOT, END], device=device))
        input_ids, inputs["attention_mask"] = input_ids[:, keep], inputs["attention_mask"][:, keep]
    answers = torch.randint(10, 900, (batch, 16), generator=torch.Generator().manual_seed(1)).to(device)
    inputs["input_ids"] = torch.cat([input_ids, answers], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answers)], dim=1)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -16:] = answers
    inputs["labels"] = labels
    inputs["rationale_input_ids"] = torch.randint(10, 900, (batch, 48), generator=torch.Generator().manual_seed(2)).to(
        device
    )
    inputs["rationale_attention_mask"] = torch.ones_like(inputs["rationale_input_ids"])
    assert IMAGE in input_ids
    return inputs


def time_step(model, inputs: dict, latent_losses: bool, repeats: int, device: str) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        out = model(**inputs, compute_latent_losses=latent_losses)
        out.loss.backward()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resident_mb() -> float:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def checkpointing_variant(variant: str, checkpointing: bool, args) -> dict:
    """One (variant, checkpointing) setting in this process: median step time and peak memory of the steps."""
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = LaReForConditionalGeneration(training_config(args.unet, args.lm)).to(device, dtype).train()
    model.reconstructor.image_tokenizer.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = 4 if variant == "all losses (K=4)" else 0
    inputs = training_batch(model.config, args.batch, device, num_latent_steps=steps, dtype=dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    else:
        base_mb = resident_mb()
    seconds = time_step(model, inputs, steps > 0, args.repeats, device)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gradients_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    return {"seconds": seconds, "peak_mb": peak_mb, "base_mb": base_mb, "gradients_mb": gradients_mb}


def compare_checkpointing(args) -> None:
    start = time.perf_counter()
    results = {}
    for variant in ("all losses (K=4)", "K=0"):
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--unet", args.unet,
                       "--lm", args.lm, "--batch", str(args.batch), "--repeats", str(args.repeats),
                       "--one", variant, str(int(checkpointing))]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[(variant, checkpointing)] = json.loads(output.strip().splitlines()[-1])
    memory = "CUDA max allocated" if args.device == "cuda" else "peak RSS"
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} batch={args.batch} "
          f"repeats={args.repeats} U-Net={args.unet} config: 256 image tokens, K=4, m=4, LM {args.lm}; memory = {memory}, 'rise' = peak minus memory once "
          f"the model is built (it holds the gradients, {results[('K=0', False)]['gradients_mb']:.0f} MB, and the "
          "activations)")  # fmt: skip
    print(f"{'variant':>18} {'checkpointing':>13} {'step ms':>9} {'peak MB':>9} {'rise MB':>9}")
    for variant in ("all losses (K=4)", "K=0"):
        for checkpointing in (False, True):
            row = results[(variant, checkpointing)]
            print(f"{variant:>18} {str(checkpointing):>13} {row['seconds'] * 1000:>9.1f} {row['peak_mb']:>9.0f} "
                  f"{row['peak_mb'] - row['base_mb']:>9.0f}")  # fmt: skip
        plain, checkpointed = results[(variant, False)], results[(variant, True)]
        peak_ratio = checkpointed["peak_mb"] / plain["peak_mb"]
        rise_ratio = (checkpointed["peak_mb"] - checkpointed["base_mb"]) / (plain["peak_mb"] - plain["base_mb"])
        time_ratio = checkpointed["seconds"] / plain["seconds"]
        print(f"{variant:>18}: with / without checkpointing: peak memory {peak_ratio:.2f}x, rise {rise_ratio:.2f}x, "
              f"step time {time_ratio:.2f}x")  # fmt: skip
    print(f"wall time of the four settings: {(time.perf_counter() - start) / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, help="timed steps after a warm-up (default 5; 1 with checkpointing)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--unet", choices=("table7", "tiny"), help="default table7 (tiny with checkpointing)")
    parser.add_argument("--lm", choices=sorted(LANGUAGE_MODELS), help="layers x width (default 8x512; 8x256 with "
                        "checkpointing)")  # fmt: skip
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpointing = args.gradient_checkpointing or args.one
    for name, plain, with_checkpointing in (("repeats", 5, 1), ("unet", "table7", "tiny"), ("lm", "8x512", "8x256")):
        if getattr(args, name) is None:
            setattr(args, name, with_checkpointing if checkpointing else plain)
    if args.one:
        print(json.dumps(checkpointing_variant(args.one[0], bool(int(args.one[1])), args)))
        return
    if args.gradient_checkpointing:
        compare_checkpointing(args)
        return
    torch.manual_seed(0)
    model = LaReForConditionalGeneration(training_config(args.unet, args.lm)).to(args.device).train()
    model.reconstructor.image_tokenizer.requires_grad_(False)
    with_latents = training_batch(model.config, args.batch, args.device, num_latent_steps=4)
    without_latents = training_batch(model.config, args.batch, args.device, num_latent_steps=0)
    results = {
        "all losses (K=4)": time_step(model, with_latents, True, args.repeats, args.device),
        "latent losses off (K=4)": time_step(model, with_latents, False, args.repeats, args.device),
        "K=0": time_step(model, without_latents, False, args.repeats, args.device),
    }
    unet_params = sum(p.numel() for p in model.reconstructor.unet.parameters()) / 1e6
    print(f"device={args.device} batch={args.batch} repeats={args.repeats} U-Net={args.unet} ({unet_params:.1f}M) "
          f"config: 256 image tokens, K=4, m=4, LM {args.lm}, {model.config.reconstruction_image_size}px crops")  # fmt: skip
    base = results["K=0"]
    for name, seconds in results.items():
        print(f"{name:>26}: {seconds * 1000:8.1f} ms  {seconds / base:5.2f}x of K=0")
    ratio = results["all losses (K=4)"] / results["latent losses off (K=4)"]
    print(f"{'all losses / losses off':>26}: {ratio:5.2f}x")


if __name__ == "__main__":
    main()
