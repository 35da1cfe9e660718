"""`lare demo`: LaRe learning to refocus, end to end, offline on CPU in a few minutes.

build a small LaRe -> write RefocusChains (easy setting: chains of 1-2 hops) -> alignment stage (captions, the
Stage I analogue) -> train LaRe and the K=0 baseline from the aligned weights (same budget) -> evaluate both on
held-out boards -> draw where each latent step refocused (refocus.png) -> chat with the saved LaRe checkpoint
through the Auto classes. The last line reads
``demo: LaRe (VARIANT) X% vs K=0 Y% on N held-out questions (window hit rate Z%)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from .destinations import refuse_non_empty

# The LaRe the demo trains, K = the longest chain: answer-only (the latent steps are the only reasoning) with the
# window-grounding loss, which is not in the paper (`LaReConfig.window_loss_weight`); without it the windows do not
# land on the evidence at this scale (docs/reproduction.md). `--variant lare_k2` trains the paper's
# LaRe (reasoning text after the latents) instead.
DEMO_VARIANT = "lare_grounded_k2"
DEMO_HOPS = (1, 2)
FULL = dict(num_train=2000, num_test=200, num_captions=3000, align_steps=600, steps=300, batch_size=32)
QUICK = dict(num_train=16, num_test=8, num_captions=16, align_steps=2, steps=2, batch_size=4)
QUICK_HELP = (
    f"a smoke run: {QUICK['num_train']} training boards, {QUICK['num_test']} held-out questions, "
    f"{QUICK['num_captions']} captions and {QUICK['steps']} training steps per stage (the full demo: "
    f"{FULL['num_train']}, {FULL['num_test']}, {FULL['num_captions']}, {FULL['align_steps']} / {FULL['steps']}); its "
    "accuracies mean nothing (used by the tests)"
)
VARIANT_HELP = (
    f"the LaRe variant to train (lare_hf.reproduction.variant names). The default, {DEMO_VARIANT}, is answer-only "
    "with the window-grounding loss, which is not in the paper; lare_k2 trains the paper's LaRe (reasoning text "
    "after the latents, no grounding loss)"
)


def run_demo(output: str, quick: bool = False, overwrite: bool = False, lare_variant: str = DEMO_VARIANT) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .build import save_checkpoint
    from .data.refocus_chains import write_refocus_chains
    from .modeling.model_card import write_model_card
    from .reproduction import (
        VARIANT_LEARNING_RATE,
        build_chains_model,
        evaluate_variant,
        train_alignment,
        train_variant,
        variant,
    )
    from .visualization import plot_refocus_grid

    settings = QUICK if quick else FULL
    spec = variant(lare_variant)
    if spec.num_latent_steps == 0:
        raise ValueError(
            f"--variant must be a LaRe variant (K >= 1), got {lare_variant!r} (K=0); e.g. {DEMO_VARIANT}."
        )
    root = refuse_non_empty(output, "lare demo --output", overwrite)
    started = time.perf_counter()
    model, processor = build_chains_model(seed=0)
    print(f"[demo] 1/6 LaRe for RefocusChains: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"(vision {model.config.vision_config.num_hidden_layers} layer, LM {model.config.text_config.num_hidden_layers}"
          f" layers of width {model.config.text_config.hidden_size}, window {model.config.window_size}x"
          f"{model.config.window_size} patch)")  # fmt: skip

    data = write_refocus_chains(root / "data", settings["num_train"], settings["num_test"], seed=0, hops=DEMO_HOPS,
                                num_captions=settings["num_captions"])  # fmt: skip
    print(f"[demo] 2/6 RefocusChains ({DEMO_HOPS} hops): {settings['num_train']} train, {settings['num_test']} "
          f"held-out questions, {settings['num_captions']} captions in {root / 'data'}")  # fmt: skip

    state, summary = train_alignment(data["captions"], root / "alignment", settings["align_steps"],
                                     settings["batch_size"], seed=0)  # fmt: skip
    print(f"[demo] 3/6 alignment stage: {settings['align_steps']} steps, caption loss {summary['losses'][0]:.2f} -> "
          f"{summary['losses'][-1]:.2f} ({summary['seconds']:.0f}s)")  # fmt: skip

    results, checkpoints = {}, {}
    for name in (lare_variant, "k0"):
        trained_spec = variant(name)
        trained, trained_processor, summary = train_variant(
            trained_spec, data["train"], root / name / "trainer", settings["steps"], settings["batch_size"],
            learning_rate=VARIANT_LEARNING_RATE, seed=0, init_state=state,
        )  # fmt: skip
        checkpoints[name] = save_checkpoint(trained, trained_processor, str(root / name))
        write_model_card(checkpoints[name])  # says what the variant adds that is not in the paper
        results[name] = evaluate_variant(trained, trained_processor, trained_spec, data["test"])
        results[name]["train_seconds"] = summary["seconds"]
        grounding = trained_spec.overrides.get("window_loss_weight", 0.0)
        print(f"[demo] 4/6 trained {name} (K={trained_spec.num_latent_steps}, {trained_spec.response_format} target"
              f"{', window grounding (not in the paper)' if grounding else ''}) for {settings['steps']} steps "
              f"({summary['seconds']:.0f}s) -> {checkpoints[name]}: held-out accuracy "
              f"{results[name]['accuracy']:.1f}% (by hops {results[name]['accuracy_by_hops']})")  # fmt: skip

    # Look at where the trained LaRe refocused: reload it as any user would.
    lare_dir = checkpoints[lare_variant]
    model = AutoModelForImageTextToText.from_pretrained(lare_dir).eval()
    processor = AutoProcessor.from_pretrained(lare_dir)
    from .evaluation.benchmarks import get_benchmark
    from .evaluation.runner import refocus_record

    samples = get_benchmark("refocus_chains").load(data["test"], limit=4)
    found = refocus_record(model, processor, samples, spec.num_latent_steps)
    rows = {row["id"]: row for row in results[lare_variant]["rows"]}
    titles = [f"{s.prompt}\ngold: {s.answer}\nLaRe: {rows[s.id]['prediction']!r}" for s in samples]
    figure = plot_refocus_grid([s.image for s in samples], found["saliency_maps"], found["window_positions"],
                               model.config.window_size, str(root / "refocus.png"), titles,
                               [s.meta["visited_cells"] for s in samples])  # fmt: skip
    print(f"[demo] 5/6 saliency and windows of each latent step for {len(samples)} held-out boards -> {figure}")

    record = json.loads(Path(data["test"]).read_text().splitlines()[-1])
    image = Image.open(Path(data["test"]).parent / record["image"]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": record["question"]}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    print(f"[demo] 6/6 chat: {record['question']!r} -> {answer!r} (gold {record['answer']!r})")

    lare, k0 = results[lare_variant], results["k0"]
    summary = {
        "variant": lare_variant,
        "response_format": spec.response_format,
        "window_loss_weight": spec.overrides.get("window_loss_weight", 0.0),
        "lare_accuracy": lare["accuracy"],
        "k0_accuracy": k0["accuracy"],
        "num_test": lare["num_test"],
        "window_hit_rate": lare["window_hit_rate"],
        "window_hit_rate_by_step": lare["window_hit_rate_by_step"],
        "accuracy_by_hops": {"lare": lare["accuracy_by_hops"], "k0": k0["accuracy_by_hops"]},
        "checkpoints": {name: str(path) for name, path in checkpoints.items()},
        "refocus_png": figure,
        "chat": {"question": record["question"], "answer": answer, "gold": record["answer"]},
        "seconds": time.perf_counter() - started,
    }
    (root / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"demo: LaRe ({lare_variant}) {lare['accuracy']:.1f}% vs K=0 {k0['accuracy']:.1f}% on {lare['num_test']} held-out questions "
          f"(window hit rate {lare['window_hit_rate']:.1f}%)")  # fmt: skip
    return summary
