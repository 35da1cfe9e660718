"""Cost of one LaRe training step (forward + backward), in one run (issue: semantic augmentation, item 7).

Same small random-init config as bench_generate.py (256 image tokens, K=4, m=4, LM 8x512), batch of 4:
  * all losses: L_ntp + L_sym + L_img (Table 7 U-Net on 256 px window crops, KL-16 tokenizer) + L_text,
  * latent losses off: the same K=4 model, next-token loss only,
  * K=0: no latent steps (a plain LLaVA-style step).

    python benchmarks/bench_train_step.py [--device cuda] [--repeats 5] [--unet table7|tiny]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_generate import END, IMAGE, SLOT, START, bench_config, make_inputs

from lare_hf import LaReConfig, LaReForConditionalGeneration
from lare_hf.modeling.reconstruction import TINY_IMAGE_TOKENIZER_CONFIG, TINY_RECONSTRUCTOR_CONFIG


def training_config(unet: str) -> LaReConfig:
    config = bench_config()
    config.use_reconstructor = True
    if unet == "tiny":
        config.reconstructor_config = dict(TINY_RECONSTRUCTOR_CONFIG)
        config.image_tokenizer_config = dict(TINY_IMAGE_TOKENIZER_CONFIG)
        config.reconstruction_image_size = 64
    return config


def training_batch(config: LaReConfig, batch: int, device: str, num_latent_steps: int):
    inputs = make_inputs(batch, config, device, torch.float32)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--unet", choices=("table7", "tiny"), default="table7")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LaReForConditionalGeneration(training_config(args.unet)).to(args.device).train()
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
          f"config: 256 image tokens, K=4, m=4, LM 8x512, {model.config.reconstruction_image_size}px crops")  # fmt: skip
    base = results["K=0"]
    for name, seconds in results.items():
        print(f"{name:>26}: {seconds * 1000:8.1f} ms  {seconds / base:5.2f}x of K=0")
    ratio = results["all losses (K=4)"] / results["latent losses off (K=4)"]
    print(f"{'all losses / losses off':>26}: {ratio:5.2f}x")


if __name__ == "__main__":
    main()
