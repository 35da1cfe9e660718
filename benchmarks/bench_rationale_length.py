"""What `max_rationale_length` (the cut of the rationale T in L_Z<->T, Eq. 6; default 64 tokens) changes on long
rationales, and what it costs.

Reasoning data such as Vision-R1-cold has rationales of hundreds of tokens, while the training cuts the rationale
whose LM hidden states T enter L_Z<->T. For a batch of image prompts with long rationales (reasoning-style text,
`--rationale-steps` sentences each) this prints, per cut (32, 64, 128, 256, 512 tokens and no cut):

* the share of the rationale tokens that reach T,
* the cosine similarity between the mean-max pooled T at that cut and at no cut (1.0: the cut changes nothing the
  loss sees),
* L_Z<->T of the same forward (same latents; only T differs),
* the seconds of one forward + backward with every latent loss.

    python benchmarks/bench_rationale_length.py [--batch 4] [--rationale-steps 40] [--repeats 2] [--trained DIR]

By default the model is the random-init `lare-tiny` preset, whose pooled T is a random function of the tokens;
`--trained DIR` measures a trained checkpoint instead (its tokenizer and LM decide how much the tail of a rationale
moves T).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

COLOURS = ["red", "green", "blue", "orange", "purple", "brown", "grey", "yellow", "pink", "cyan"]


def long_rationale(seed: int, steps: int) -> str:
    """Reasoning-style text: one sentence per hop of a long chain over coloured cells."""
    rng = np.random.default_rng(seed)
    path = rng.choice(COLOURS, size=steps + 1)
    return " ".join(
        f"Step {index + 1}: the {here} cell's mark names {there}, so the next cell to read is the {there} one."
        for index, (here, there) in enumerate(zip(path[:-1], path[1:]))
    )


def load(trained: str | None):
    if trained is None:
        from lare_hf.build import build_tiny

        return build_tiny(seed=0)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import lare_hf  # noqa: F401  (registers the Auto classes)

    return AutoModelForImageTextToText.from_pretrained(trained), AutoProcessor.from_pretrained(trained)


def pooled_text(model, rationale_ids: torch.Tensor, rationale_mask: torch.Tensor) -> torch.Tensor:
    from lare_hf.modeling.losses import mean_max_pool

    with torch.no_grad():
        hidden = model.model.language_model(
            input_ids=rationale_ids, attention_mask=rationale_mask, use_cache=False
        ).last_hidden_state
    return mean_max_pool(hidden, rationale_mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rationale-steps", type=int, default=40, help="sentences per rationale")
    parser.add_argument("--cuts", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per cut (the fastest is printed)")
    parser.add_argument("--trained", default=None, help="a trained LaRe checkpoint (default: random lare-tiny)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, processor = load(args.trained)
    model.train()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(args.batch)]
    rationales = [long_rationale(seed, args.rationale_steps) for seed in range(args.batch)]
    prompts = [
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Which cell does the chain end on?"}],
            }
        ]
        for _ in range(args.batch)
    ]
    answers = ["the blue cell"] * args.batch
    lengths = [len(processor.tokenizer.encode(r, add_special_tokens=False)) for r in rationales]
    full = processor.build_training_inputs(prompts, answers, images=images, rationales=rationales)
    reference = pooled_text(model, full["rationale_input_ids"], full["rationale_attention_mask"])
    print(f"rationale lengths (tokens): min {min(lengths)}, mean {np.mean(lengths):.0f}, max {max(lengths)}")
    model(**full, compute_latent_losses=True).loss.backward()  # warm-up, not timed
    rows = []
    for cut in [*args.cuts, None]:
        inputs = processor.build_training_inputs(
            prompts, answers, images=images, rationales=rationales, max_rationale_length=cut
        )
        kept = inputs["rationale_attention_mask"].sum().item() / sum(lengths)
        pooled = pooled_text(model, inputs["rationale_input_ids"], inputs["rationale_attention_mask"])
        similarity = torch.nn.functional.cosine_similarity(pooled, reference, dim=-1).mean().item()
        seconds, text_loss = [], None
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            outputs = model(**inputs, compute_latent_losses=True)
            outputs.loss.backward()
            seconds.append(time.perf_counter() - started)
            text_loss = outputs.alignment_text_loss.item()
        row = {
            "max_rationale_length": cut,
            "tokens_kept": round(100 * kept, 1),
            "pooled_T_cosine_to_uncut": round(similarity, 4),
            "L_Z<->T": round(text_loss, 4),
            "step_seconds": round(min(seconds), 3),
        }
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
