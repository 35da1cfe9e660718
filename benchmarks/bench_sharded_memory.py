"""Peak memory per rank of a LaRe training step under DDP, FSDP2 and DeepSpeed ZeRO-3, 2 CPU processes (gloo), in
one run (issue 24, item 5; the engines are not in the paper).

The model is sized so that parameters, gradients and AdamW state dominate: the vision tower, projector and Extractor
of bench_generate.py (256 image tokens, K=4, m=4) with a wider language model (1024 wide, 8 layers, 32k vocabulary,
~123M parameters) and the tiny U-Net, every loss on, batch of 2 per rank, AdamW. Each engine runs in 2 fresh
processes: build the model (seeded, the same on both ranks), wrap it (DDP / `apply_fsdp2` / `deepspeed.initialize`
with ZeRO stage 3 and the same torch AdamW), reset the process's peak resident set size (`/proc/self/clear_refs`),
then `--steps` steps (1: the first step already holds the gradients and the AdamW state); the figure is the peak RSS of each rank during those steps (VmHWM), and its rise above the RSS the
rank had before the model was built (Python, torch, the process group). glibc is told to return large frees to the
system at once (`MALLOC_MMAP_THRESHOLD_`), so that memory freed by sharding is not counted. ZeRO-3 runs where
DeepSpeed is installed (its CPU accelerator; otherwise it is reported as skipped).

    python benchmarks/bench_sharded_memory.py [--steps 1] [--engines ddp fsdp2 zero3]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_train_step import training_batch, training_config

WORLD_SIZE = 2
LEARNING_RATE = 1e-4


def sharding_config():
    config = training_config("tiny")
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 2816, 8
    text.num_attention_heads, text.num_key_value_heads, text.vocab_size = 16, 4, 32000
    return config


def rss_mb(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def wrap(model, engine: str):
    """The model to call and the optimizer to step for `engine`."""
    parameters = lambda module: [param for param in module.parameters() if param.requires_grad]  # noqa: E731
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
        return model, torch.optim.AdamW(parameters(model), lr=LEARNING_RATE)
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        from lare_hf.training.fsdp import apply_fsdp2

        model = apply_fsdp2(model, init_device_mesh("cpu", (WORLD_SIZE,)))
        return model, torch.optim.AdamW(parameters(model), lr=LEARNING_RATE)
    import deepspeed

    hidden = model.config.text_config.hidden_size
    config = {
        "train_micro_batch_size_per_gpu": 2,
        # the bucket sizes Trainer's "auto" gives (DeepSpeed's defaults, 5e8 elements, are sized for large GPUs)
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    optimizer = torch.optim.AdamW(parameters(model), lr=LEARNING_RATE)
    engine_model, engine_optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine_model, engine_optimizer


def worker(rank: int, engine: str, port: int, steps: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    from lare_hf import LaReForConditionalGeneration

    try:
        before_model = rss_mb("VmRSS")
        config = sharding_config()
        torch.manual_seed(0)
        model = LaReForConditionalGeneration(config).train()
        num_parameters = sum(param.numel() for param in model.parameters())
        model, optimizer = wrap(model, engine)
        inputs = training_batch(config, 2, "cpu", config.num_latent_steps)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM, the peak RSS
        start = time.perf_counter()
        for _ in range(steps):
            outputs = model(**inputs, compute_latent_losses=True)
            if engine == "zero3":
                model.backward(outputs.loss)
                model.step()
            else:
                outputs.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        seconds = (time.perf_counter() - start) / steps
        result = {"peak_mb": rss_mb("VmHWM"), "before_model_mb": before_model, "step_s": seconds}
        result["num_parameters"] = num_parameters
        with open(os.path.join(out_dir, f"{engine}_rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp2", "zero3"], choices=["ddp", "fsdp2", "zero3"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned processes
    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for engine in args.engines:
            if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
                print("zero3: skipped (DeepSpeed is not installed)")
                continue
            mp.spawn(worker, args=(engine, free_port(), args.steps, out_dir), nprocs=WORLD_SIZE, join=True)
            results[engine] = [
                json.load(open(os.path.join(out_dir, f"{engine}_rank{rank}.json"))) for rank in range(WORLD_SIZE)
            ]
    print(
        f"{next(iter(results.values()))[0]['num_parameters'] / 1e6:.0f}M parameters, {WORLD_SIZE} gloo CPU processes, {args.steps} steps"
    )
    print(f"{'engine':8} {'rank':>4} {'peak RSS MiB':>13} {'rise MiB':>9} {'s/step':>7}")
    for engine, per_rank in results.items():
        for rank, result in enumerate(per_rank):
            rise = result["peak_mb"] - result["before_model_mb"]
            print(f"{engine:8} {rank:>4} {result['peak_mb']:>13.0f} {rise:>9.0f} {result['step_s']:>7.1f}")
    ddp = results.get("ddp")
    for engine, per_rank in results.items():
        if engine == "ddp" or ddp is None:
            continue
        peak = max(r["peak_mb"] for r in per_rank) / max(r["peak_mb"] for r in ddp)
        rise = max(r["peak_mb"] - r["before_model_mb"] for r in per_rank) / max(
            r["peak_mb"] - r["before_model_mb"] for r in ddp
        )
        print(f"{engine} / ddp: peak RSS per rank x{peak:.2f}, rise above the pre-model RSS x{rise:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
