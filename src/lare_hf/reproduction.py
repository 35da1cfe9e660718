"""Small-scale, CPU reproduction of LaRe on RefocusChains: the variants of the paper's Tables 1 and 3.

Every variant starts from the same weights and trains with the same budget (steps x batch, optimiser, seed):

* an alignment stage first (the paper's Stage I analogue, `train_alignment`): the vision tower, projector and LM
  learn, from random init, to read the board ("List the mark of every cell." -> "cells: red green, ..."), on train
  boards only. Its weights initialise every variant (the Extractor, reconstructor and heads start random);
* ``k0``: the no-latent baseline (K=0, trained on the bare answer);
* ``cot``: explicit chain of thought (K=0, trained on "path: red green blue\\nAnswer: the blue cell");
* ``lare``: LaRe as in the paper (K latent steps, all losses of Eq. 10, then the same text as ``cot``);
* ``lare_answer``: LaRe with the latent steps as the only reasoning (K steps, all losses, bare answer): the
  answer-only target is not in the paper, whose LaRe writes reasoning text after the latents;
* ``lare_steps``: ``lare_answer`` plus per-step supervision, a lever that is not in the paper: the LM's prediction
  at the position whose attention picks step k's window is trained on the colour hop k reaches
  (`LaReDataCollator.latent_step_targets`), so each latent step has its own target instead of only the final
  answer (the role Coconut's step-by-step curriculum plays);
* ``lare_grounded``: ``lare_answer`` plus a window-grounding loss, also not in the paper (`window_loss_weight` 1):
  step k's saliency map is trained, by cross-entropy, to peak on the cell hop k reads (`chain_window_targets`),
  since the argmax window gives its choice no gradient of its own;
* ``lare_st_answer``, ``lare_gumbel_answer``, ``lare_soft_answer``: ``lare_answer`` with a label-free window selection
  that the answer's gradient reaches, not in the paper (`LaReConfig.window_selection` "straight_through", "gumbel",
  "soft"; tau annealed from `RELAXED_WINDOW_TEMPERATURE` start to end over training; the argmax window at
  evaluation); ``lare_st`` / ``lare_soft``: the same on the paper's target (path + answer after the latents);
* ``lare_coconut``: ``lare_answer`` reached by Coconut's curriculum (Hao et al. 2024; not in the LaRe paper, whose
  Stage IV data allows it): the budget is split into K+1 equal stages; stage c < K trains c latent steps followed by
  the path from hop c on (`chain_rationale_after`), stage 0 being chain of thought without latent losses; the last
  stage is ``lare_answer`` itself (K steps, bare answer);
* ablations (Table 3) of a LaRe variant: ``no_extractor``, ``no_window``, ``no_sym``, ``no_img``, ``no_text``;
  and ``{lare,lare_answer,lare_steps,lare_grounded,lare_coconut}_k{K}`` for other step counts.

Deviation from the paper, forced by the offline 2-core setting: no pretrained CLIP / Qwen2.5 exists here, so the
whole tiny model (`CHAINS_MODEL_CONFIG`) trains from random init; the alignment stage is what Stage I does for the
paper's pretrained parts. `benchmarks/reproduce.py` runs the variants over several seeds.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from .build import build_tiny, save_checkpoint
from .data.collator import LaReDataCollator
from .data.formats import load_records
from .data.refocus_chains import (
    chain_rationale_after,
    chain_step_targets,
    chain_window_targets,
    window_hit_rates_by_step,
)
from .evaluation.benchmarks import get_benchmark
from .evaluation.runner import generate_answers, refocus_record
from .modeling.configuration_lare import LaReConfig
from .training.arguments import LaReTrainingArguments
from .training.trainer import LaReTrainer

# A LaRe small enough to train on a 2-core CPU in minutes, shaped for RefocusChains' 24-px boards: one 8-px patch
# per cell (9 image tokens), a one-patch window (the cell a step reads), m=1 latent token per step.
CHAINS_MODEL_CONFIG: dict[str, Any] = {
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "patch_size": 8,
        "image_size": 24,
        "projection_dim": 64,
    },
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    "image_seq_length": 9,
    "num_latent_steps": 4,
    "max_latent_steps": 8,
    "latent_tokens_per_step": 1,
    "extractor_num_layers": 2,
    "extractor_num_heads": 4,
    "window_size": 1,
    "window_stride": 1,
    "text_prefix_length": 16,
    "use_reconstructor": True,
    "reconstruction_image_size": 32,
    "reconstructor_config": "tiny",
    "image_tokenizer_config": "tiny",
}


@dataclass(frozen=True)
class Variant:
    """One trained configuration: K, the response it learns to write, the latent losses, config overrides."""

    name: str
    num_latent_steps: int
    response_format: str
    latent_losses: bool
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    step_supervision: bool = False
    coconut: bool = False


# The temperature schedule of the label-free window selections (not in the paper): tau annealed geometrically from a
# soft choice to a nearly hard one over each variant's steps (`WindowTemperatureCallback`).
RELAXED_WINDOW_TEMPERATURE = {"window_temperature": 1.0, "window_temperature_end": 0.1}

VARIANTS: dict[str, Variant] = {
    "k0": Variant("k0", 0, "answer", False, description="no-latent baseline (K=0, bare answer)"),
    "cot": Variant("cot", 0, "reasoning", False, description="explicit chain of thought (K=0, path + answer)"),
    "lare": Variant("lare", 4, "reasoning", True, description="LaRe (K=4, all losses, path + answer; the paper)"),
    "lare_answer": Variant(
        "lare_answer",
        4,
        "answer",
        True,
        description="LaRe, latent reasoning only (K=4, all losses, bare answer; answer-only target not in the paper)",
    ),
    "lare_steps": Variant(
        "lare_steps",
        4,
        "answer",
        True,
        description="lare_answer + per-step supervision of the latent steps (not in the paper)",
        step_supervision=True,
    ),
    "lare_grounded": Variant(
        "lare_grounded",
        4,
        "answer",
        True,
        overrides={"window_loss_weight": 1.0},
        description="lare_answer + a window-grounding loss on the needed cell (not in the paper)",
    ),
    **{
        name: Variant(
            name,
            4,
            response_format,
            True,
            overrides={"window_selection": selection, **RELAXED_WINDOW_TEMPERATURE},
            description=f"{base} with a {label} window selection, tau annealed "
            f"{RELAXED_WINDOW_TEMPERATURE['window_temperature']} -> {RELAXED_WINDOW_TEMPERATURE['window_temperature_end']}"
            " (no window labels; not in the paper)",
        )
        for name, base, response_format, selection, label in (
            ("lare_st_answer", "lare_answer", "answer", "straight_through", "straight-through"),
            ("lare_gumbel_answer", "lare_answer", "answer", "gumbel", "straight-through Gumbel-softmax"),
            ("lare_soft_answer", "lare_answer", "answer", "soft", "soft (expected-window)"),
            ("lare_st", "lare", "reasoning", "straight_through", "straight-through"),
            ("lare_soft", "lare", "reasoning", "soft", "soft (expected-window)"),
        )
    },
    "lare_coconut": Variant(
        "lare_coconut",
        4,
        "answer",
        True,
        description="lare_answer trained by Coconut's curriculum (not in the paper): stage c = c latent steps + the "
        "path after hop c",
        coconut=True,
    ),
}
ABLATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "no_extractor": ({"use_extractor": False}, "w/o Extractor"),
    "no_window": ({"use_sliding_window": False}, "w/o sliding window"),
    "no_sym": ({"sym_loss_weight": 0.0}, "w/o symmetric alignment"),
    "no_img": ({"image_loss_weight": 0.0}, "w/o image reconstruction"),
    "no_text": ({"text_loss_weight": 0.0}, "w/o text prefix reconstruction"),
}


def variant(name: str, ablation_base: str = "lare") -> Variant:
    """A variant by name: one of `VARIANTS`, an `ABLATIONS` key (applied to `ablation_base`; default the paper's
    ``lare``, as `benchmarks/reproduce.py --ablation-base` and the README use), or ``{base}_k{K}`` for
    a LaRe variant `base` of `VARIANTS` (``lare_k2``, ``lare_grounded_k2``, ...: that variant with K latent steps)."""
    if name in VARIANTS:
        return VARIANTS[name]
    lare = [n for n, v in VARIANTS.items() if v.num_latent_steps]
    if name in ABLATIONS:
        if ablation_base not in lare:
            raise ValueError(f"ablation_base must be a LaRe variant ({', '.join(lare)}), got {ablation_base!r}.")
        overrides, description = ABLATIONS[name]
        base = VARIANTS[ablation_base]
        return replace(
            base, name=name, overrides={**base.overrides, **overrides}, description=f"{base.name} {description}"
        )
    for base_name in lare:
        prefix = f"{base_name}_k"
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            steps = int(name[len(prefix) :])
            if not 1 <= steps <= CHAINS_MODEL_CONFIG["max_latent_steps"]:
                raise ValueError(f"{name}: K must be in 1..{CHAINS_MODEL_CONFIG['max_latent_steps']}, got {steps}.")
            base = VARIANTS[base_name]
            return replace(base, name=name, num_latent_steps=steps, description=f"{base.name} with K={steps}")
    valid = sorted(VARIANTS) + sorted(ABLATIONS) + [f"{n}_k{{K}}" for n in lare]
    raise ValueError(f"Unknown variant {name!r}; valid names: {', '.join(valid)}.")


class FromScratchTrainer(LaReTrainer):
    """Every module but the frozen image tokenizer trains (no pretrained parts exist offline)."""

    stage = 0
    trainable_groups = ("vision", "projector", "latent", "language_model")


def build_chains_model(overrides: dict[str, Any] | None = None, seed: int = 0):
    """(model, processor) of `CHAINS_MODEL_CONFIG` (plus `overrides`), random init for `seed`."""
    return build_tiny(overrides={**CHAINS_MODEL_CONFIG, **(overrides or {})}, seed=seed)


def _training_arguments(output_dir: Path, steps: int, batch_size: int, learning_rate: float, seed: int):
    return LaReTrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=0.05,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        logging_steps=max(1, min(50, steps // 10)),
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _train(model, processor, trainer_cls, records, collator, output_dir, steps, batch_size, learning_rate, seed):
    trainer = trainer_cls(
        model=model,
        args=_training_arguments(output_dir, steps, batch_size, learning_rate, seed),
        train_dataset=records,
        data_collator=collator,
        processing_class=processor,
    )
    started = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    window_callback = trainer.window_selection_callback
    return {
        "seconds": time.perf_counter() - started,
        "losses": losses,
        "log_history": trainer.state.log_history,
        "window_selection_history": window_callback.history if window_callback is not None else [],
    }


# The alignment stage's peak learning rate. At 3e-3 its caption loss sat on the ~0.97 plateau (marks not read) for
# most of 1,500 steps and broke through on some seeds only; at 1e-3 it broke through within ~300-500 steps
# (docs/reproduction.md, "The run at lr 3e-3: a negative result").
ALIGN_LEARNING_RATE = 1e-3
# The peak learning rate every variant trains with (the default of `train_variant` / `run_variant`, and what
# `benchmarks/reproduce.py` and `lare demo` pass): at 3e-3, K=0 did not learn the one-hop question on an aligned model
# within 300 steps (20% against 86% at 1e-3; docs/reproduction.md).
VARIANT_LEARNING_RATE = 1e-3


def train_alignment(
    captions_file: str,
    output_dir: str | Path,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = ALIGN_LEARNING_RATE,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The Stage I analogue: vision tower, projector and LM learn to read boards from the caption records.

    Returns (state dict of the trained model, training summary with seconds and the logged losses)."""
    set_seed(seed)
    model, processor = build_chains_model(seed=seed)
    trainer_cls = type("AlignmentTrainer", (FromScratchTrainer,), {"latent_losses": False})
    trainer_cls.configure_model(model)
    collator = LaReDataCollator(
        processor=processor, num_latent_steps=0, with_rationale=False, response_format="answer"
    )
    summary = _train(
        model, processor, trainer_cls, load_records(captions_file), collator, Path(output_dir),
        steps, batch_size, learning_rate, seed,
    )  # fmt: skip
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, summary


# parameters the alignment stage trains and hands on to every variant
ALIGNED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.")


def train_variant(
    spec: Variant,
    train_file: str,
    output_dir: str | Path,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = VARIANT_LEARNING_RATE,
    seed: int = 0,
    init_state: dict[str, torch.Tensor] | None = None,
    curriculum_steps: int = 0,
):
    """Train one variant from random init (or from the aligned `init_state`); returns (model, processor, summary).

    With `curriculum_steps` > 0 the first that many steps train on the one-hop questions of `train_file` only, the
    remaining `steps` - `curriculum_steps` on all of them (a curriculum over chain length, not in the paper; each
    phase is its own `Trainer` run with its own warmup and cosine schedule). A ``coconut`` variant trains in K+1
    stages instead (`_phases`: Coconut's curriculum, not in the paper)."""
    set_seed(seed)
    model, processor = build_chains_model(spec.overrides, seed=seed)
    if init_state is not None:
        aligned = {k: v for k, v in init_state.items() if k.startswith(ALIGNED_PREFIXES)}
        missing = [k for k in aligned if k not in model.state_dict()]
        if missing:
            raise ValueError(f"init_state has parameters this variant's model lacks: {missing[:5]}")
        model.load_state_dict(aligned, strict=False)
    if not 0 <= curriculum_steps <= steps:
        raise ValueError(f"curriculum_steps must be in 0..steps ({steps}), got {curriculum_steps}.")
    if spec.coconut and curriculum_steps:
        raise ValueError(f"{spec.name} has its own curriculum (Coconut's); curriculum_steps must be 0.")
    phases = _phases(spec, train_file, steps, curriculum_steps)
    summary = {"seconds": 0.0, "losses": [], "log_history": [], "window_selection_history": []}
    phase_summaries = []
    for phase_file, phase_steps, phase_spec, response_rationale in phases:
        if phase_steps == 0:
            continue
        trainer_cls = type(
            f"{phase_spec.name}Trainer", (FromScratchTrainer,), {"latent_losses": phase_spec.latent_losses}
        )
        trainer_cls.configure_model(model)
        processor.num_latent_steps = phase_spec.num_latent_steps
        collator = LaReDataCollator(
            processor=processor,
            num_latent_steps=phase_spec.num_latent_steps,
            with_rationale=phase_spec.latent_losses,
            response_format=phase_spec.response_format,
            max_rationale_length=32,
            latent_step_targets=chain_step_targets if phase_spec.step_supervision else None,
            window_targets=chain_window_targets if phase_spec.overrides.get("window_loss_weight", 0) > 0 else None,
            response_rationale=response_rationale,
        )
        phase = _train(
            model, processor, trainer_cls, load_records(phase_file), collator, Path(output_dir),
            phase_steps, batch_size, learning_rate, seed,
        )  # fmt: skip
        for key in summary:
            summary[key] += phase[key]
        lm_losses = [entry["lm_loss"] for entry in phase["log_history"] if "lm_loss" in entry]
        phase_summaries.append(
            {
                "name": phase_spec.name,
                "steps": phase_steps,
                "num_latent_steps": phase_spec.num_latent_steps,
                "response_format": phase_spec.response_format,
                "final_lm_loss": lm_losses[-1] if lm_losses else None,
            }
        )
    summary["phases"] = phase_summaries
    model.eval()
    return model, processor, summary


def _phases(spec: Variant, train_file: str, steps: int, curriculum_steps: int):
    """The training phases of `spec` as (records file, steps, the phase's variant, the rationale its response writes
    or None for the record's own); each phase is its own `Trainer` run (own warmup and cosine schedule)."""
    if not spec.coconut:
        first = [(one_hop_file(train_file), curriculum_steps, spec, None)] if curriculum_steps else []
        return first + [(train_file, steps - curriculum_steps, spec, None)]
    stages = [  # stage c < K: c latent steps, then the path from hop c on; stage 0 is chain of thought
        replace(spec, name=f"{spec.name}_stage{c}", num_latent_steps=c, response_format="reasoning",
                latent_losses=spec.latent_losses and c > 0)
        for c in range(spec.num_latent_steps)
    ]  # fmt: skip
    per_stage = steps // (len(stages) + 1)
    phases = [(train_file, per_stage, stage, chain_rationale_after(stage.num_latent_steps)) for stage in stages]
    return phases + [(train_file, steps - per_stage * len(stages), spec, None)]  # the last stage: `spec` itself


def one_hop_file(train_file: str) -> str:
    """The one-hop records of a RefocusChains JSONL file, written next to it (``<name>.h1.jsonl``)."""
    source = Path(train_file)
    target = source.with_suffix(".h1.jsonl")
    if not target.exists():
        lines = [line for line in source.read_text().splitlines() if json.loads(line).get("hops") == 1]
        if not lines:
            raise ValueError(f"{train_file} has no one-hop record for the curriculum; generate it with hops=(1, ...).")
        target.write_text("\n".join(lines) + "\n")
    return str(target)


def evaluate_variant(
    model, processor, spec: Variant, test_file: str, batch_size: int = 64, max_new_tokens: int = 32
) -> dict[str, Any]:
    """Greedy held-out accuracy (overall and by number of hops), generated tokens, and, for LaRe variants, how
    often latent step k's window covers the cell reasoning step k reads (`window_hits`)."""
    bench = get_benchmark("refocus_chains")
    samples = bench.load(test_file)
    texts, counts, seconds = generate_answers(
        model, processor, samples, spec.num_latent_steps, batch_size, max_new_tokens, progress=False
    )
    rows = bench.judge(samples, texts)
    report = bench.score(samples, texts)
    correct_counts = [c for c, row in zip(counts, rows) if row["correct"]]
    result: dict[str, Any] = {
        "variant": spec.name,
        "description": spec.description,
        "num_latent_steps": spec.num_latent_steps,
        "response_format": spec.response_format,
        "accuracy": report["accuracy"],
        "accuracy_by_hops": report["per_category"],
        "num_test": len(samples),
        "tokens": float(np.mean(counts)),
        "tokens_correct": float(np.mean(correct_counts)) if correct_counts else None,
        "eval_seconds": seconds,
    }
    windows = None
    if spec.num_latent_steps > 0:
        windows = refocus_record(model, processor, samples, spec.num_latent_steps, batch_size)["window_positions"]
        visited = [sample.meta["visited_cells"] for sample in samples]
        hits = window_hit_rates_by_step(windows.tolist(), visited, model.config.effective_window_size)
        result["window_hit_rate"] = hits["window_hit_rate"]
        result["window_hit_rate_by_step"] = hits["window_hit_rate_by_step"]
    result["rows"] = [
        {**row, "num_tokens": count, **({"windows": windows[i].tolist()} if windows is not None else {})}
        for i, (row, count) in enumerate(zip(rows, counts))
    ]
    return result


def run_variant(
    spec: Variant,
    data: dict[str, str],
    output_dir: str | Path,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = VARIANT_LEARNING_RATE,
    seed: int = 0,
    init_state: dict[str, torch.Tensor] | None = None,
    save_model: bool = False,
    curriculum_steps: int = 0,
) -> dict[str, Any]:
    """Train `spec` on ``data["train"]``, evaluate on ``data["test"]``; optionally save the checkpoint."""
    output = Path(output_dir)
    model, processor, summary = train_variant(
        spec, data["train"], output / "trainer", steps, batch_size, learning_rate, seed, init_state, curriculum_steps
    )
    result = evaluate_variant(model, processor, spec, data["test"])
    result.update(
        {
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "curriculum_steps": curriculum_steps,
            "train_seconds": summary["seconds"],
            "final_loss": summary["losses"][-1] if summary["losses"] else None,
            "losses": summary["losses"],
            "phases": summary["phases"],
            **variant_settings(spec),
            "window_selection_history": summary["window_selection_history"],
        }
    )
    if save_model:
        save_checkpoint(model, processor, str(output / "model"))
        result["model_dir"] = str(output / "model")
    return result


def variant_settings(spec: Variant) -> dict[str, Any]:
    """The settings that define `spec`, for the results file: K, the response format, the latent losses, the window
    selection and its temperature schedule, the window-grounding weight (the config's value where `spec` does not
    override it) and every config override."""
    parameters = inspect.signature(LaReConfig.__init__).parameters
    defaults = {name: parameters[name].default for name in WINDOW_SETTINGS}
    return {
        "num_latent_steps": spec.num_latent_steps,
        "response_format": spec.response_format,
        "latent_losses": spec.latent_losses,
        "step_supervision": spec.step_supervision,
        "coconut": spec.coconut,
        **{name: spec.overrides.get(name, default) for name, default in defaults.items()},
        "overrides": dict(spec.overrides),
    }


# the window settings every result records (`variant_settings`)
WINDOW_SETTINGS = ("window_loss_weight", "window_selection", "window_temperature", "window_temperature_end")


def mean_std_ci(values: list[float], confidence: float = 0.95) -> dict[str, float | None]:
    """Mean, sample standard deviation and the Student-t confidence interval of the mean (scipy)."""
    from scipy import stats

    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "std": None, "ci_low": None, "ci_high": None, "n": len(values)}
    std = float(np.std(values, ddof=1))
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=std / math.sqrt(len(values)))
    if std == 0:
        low = high = mean
    return {"mean": mean, "std": std, "ci_low": float(low), "ci_high": float(high), "n": len(values)}


__all__ = [
    "ABLATIONS",
    "ALIGN_LEARNING_RATE",
    "VARIANT_LEARNING_RATE",
    "CHAINS_MODEL_CONFIG",
    "VARIANTS",
    "FromScratchTrainer",
    "Variant",
    "build_chains_model",
    "evaluate_variant",
    "mean_std_ci",
    "run_variant",
    "train_alignment",
    "train_variant",
    "variant",
    "variant_settings",
    "WINDOW_SETTINGS",
]
