"""`lare demo`: the whole pipeline on the offline tiny preset.

build lare-tiny -> generate RefocusShapes -> train stages I-IV (short runs, each checkpoint in its own folder) ->
evaluate the stage-IV model with and without latent steps -> chat with it and show where it refocused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from .build import build_tiny, save_checkpoint
from .destinations import refuse_non_empty

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def run_demo(output: str, quick: bool = False, overwrite: bool = False) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .data.refocus_shapes import write_refocus_shapes
    from .evaluation.runner import evaluate
    from .training.run import run_all

    root = refuse_non_empty(output, "lare demo --output", overwrite)
    model, processor = build_tiny()
    model_dir = save_checkpoint(model, processor, str(root / "model"))
    print(
        f"[demo] 1/5 built lare-tiny ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) in {model_dir}"
    )

    data = write_refocus_shapes(str(root / "data"), 32 if quick else 128, 16 if quick else 64, seed=0, image_size=64)
    print(f"[demo] 2/5 wrote RefocusShapes train/test to {root / 'data'}")

    recipes = [str(CONFIGS_DIR / "tiny" / f"stage{stage}.yaml") for stage in (1, 2, 3, 4)]
    overrides = ["--train_file", data["train"], "--disable_tqdm", "True"]
    if quick:
        overrides += ["--max_steps", "2"]
    if overwrite:
        overrides += ["--overwrite", "True"]
    records = run_all(recipes, model_name_or_path=str(model_dir), overrides=overrides, output_root=str(root))
    for record in records:
        losses = ", ".join(f"{key}={value:.3f}" for key, value in record["last_logged_losses"].items())
        print(
            f"[demo] 3/5 stage {record['stage']}: {record['global_steps']} steps -> {root / ('stage' + str(record['stage']))} ({losses})"
        )

    final = root / "stage4"
    reports = {}
    for steps in (4, 0):
        report = evaluate(str(final), "refocus_shapes", data["test"], num_latent_steps=steps, batch_size=16,
                          max_new_tokens=8, output_dir=str(root / f"eval_k{steps}"), progress=False)  # fmt: skip
        reports[steps] = report
        print(f"[demo] 4/5 eval K={steps}: accuracy {report['accuracy']:.1f}% on {report['num_samples']} questions, "
              f"{report['latency_s_per_sample'] * 1000:.0f} ms/question")  # fmt: skip

    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    record = json.loads(Path(data["test"]).read_text().splitlines()[0])
    image = Image.open(Path(data["test"]).parent / record["image"]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": record["question"]}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8)
        refocus = model(**inputs)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    windows = refocus.window_positions[0].tolist()
    print(f"[demo] 5/5 Q: {record['question']!r} gold: {record['answer']!r} model: {answer.strip()!r}")
    print(f"[demo]     windows (row, col) refocused on per latent step: {windows}")
    return {"model_dir": str(model_dir), "stages": records, "eval": reports, "answer": answer, "windows": windows}
