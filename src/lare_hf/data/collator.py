"""Batch normalised examples (see `lare_hf.data.formats`) into model inputs with `LaReProcessor`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

REASONING_TEMPLATE = "{rationale}\nAnswer: {answer}"
RESPONSE_FORMATS = ("reasoning", "answer")


def response_text(answer: str, rationale: str | None, response_format: str = "reasoning") -> str:
    """The text the model is trained to generate after the prompt (and after `<|latent_end|>`).

    "reasoning" (the paper, Sec. 3.1: after the latent steps the model generates its reasoning in text, then the
    answer): ``"{rationale}\nAnswer: {answer}"``, or the bare answer when the example has no rationale;
    "answer": the bare answer (short-answer fine-tuning, e.g. captions or multiple-choice letters; for reasoning data
    it is not in the paper: the latents then carry all the reasoning).
    """
    if response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}, got {response_format!r}.")
    if response_format == "reasoning" and isinstance(rationale, str) and rationale.strip():
        return REASONING_TEMPLATE.format(rationale=rationale.strip(), answer=answer)
    return answer


# The normalised example's columns the collator reads (Trainer must not remove them).
DATA_COLUMNS = ("messages", "answer", "rationale", "image", "id")


def _example_id(feature: dict[str, Any], position: int) -> str:
    return str(feature.get("id") if feature.get("id") is not None else f"batch position {position}")


@dataclass
class LaReDataCollator:
    """Collate examples `{"messages", "answer", "rationale", "image", "id"}` for `Trainer`.

    Calls `processor.build_training_inputs` and returns its tensors as a dict: input_ids, attention_mask, labels
    (-100 everywhere but the answer), pixel_values when the batch has images, rationale_input_ids /
    rationale_attention_mask when `with_rationale` is True.

    Args:
        processor: a `LaReProcessor`.
        num_latent_steps: K latent steps written into each sequence (None: the processor's default; 0: no latent
            slots, stage I / plain baseline).
        with_rationale: pass the rationales (for the latent losses); an example without one gets an all-0 row of
            `rationale_attention_mask`, and the model leaves it out of L_sym-text and L_text (Stage III mixes
            conversations without rationales with reasoning records).
        max_answer_length, max_rationale_length: truncation lengths in tokens (None: no truncation;
            `max_answer_length` applies to the whole response).
        response_format: what the model learns to generate (`response_text`): "reasoning" (default, the paper's
            target: rationale, then "Answer: ..."; the bare answer for examples without a rationale) or "answer".
            The explicit chain-of-thought baseline is "reasoning" with K=0 and `with_rationale=False`.
        latent_step_targets: per-step supervision of the latent phase (not in the paper; a lever of the small-scale
            reproduction, see benchmarks/reproduce.py): a function giving, per example, the text each latent step
            should resolve (e.g. the colour reached by hop k). The LM's prediction at the position whose attention
            chooses step k's window (`<|latent_start|>` for k=1, else step k-1's last latent slot) is trained on the
            first token of " " + target k, for k <= min(K, number of targets). None (default): no such labels.
        window_targets: window grounding (not in the paper; a lever of the small-scale reproduction, used with
            `window_loss_weight` > 0): a function giving, per example with an image, the image-token index
            (row-major patch grid) each reasoning step needs, e.g. RefocusChains' `chain_window_targets`. Adds
            `window_targets` `[batch, K]` (-100 after the chain, and in rows without an image). None (default):
            not added.
        response_rationale: the reasoning written in the "reasoning" response, per example (None: the example's
            own rationale). A curriculum that replaces the first reasoning steps by latent steps, as Coconut does
            (not in the paper), writes only the rest; the latent losses keep the full rationale.

    A batch may mix examples with an image and text-only ones: a text-only prompt has no latent region (the
    latent phase refocuses on the image) and is left-padded with the others; `pixel_values` holds the images of
    the examples that have one, in order.
    """

    processor: Any
    num_latent_steps: int | None = None
    with_rationale: bool = True
    max_answer_length: int | None = None
    max_rationale_length: int | None = None
    response_format: str = "reasoning"
    latent_step_targets: Callable[[dict[str, Any]], Sequence[str]] | None = None
    window_targets: Callable[[dict[str, Any]], Sequence[int]] | None = None
    response_rationale: Callable[[dict[str, Any]], str | None] | None = None

    def __post_init__(self) -> None:
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(
                f"response_format must be one of {RESPONSE_FORMATS}, got {self.response_format!r}: 'reasoning' "
                "trains on 'rationale + Answer: answer' (the paper), 'answer' on the bare answer."
            )

    @staticmethod
    def _rationales(features: list[dict[str, Any]]) -> list[str | None]:
        """Each example's rationale, None where it has none (missing or blank)."""
        rationales = []
        for feature in features:
            rationale = feature.get("rationale")
            rationales.append(rationale if isinstance(rationale, str) and rationale.strip() else None)
        return rationales

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("LaReDataCollator got an empty batch.")
        for position, feature in enumerate(features):
            missing = [key for key in ("messages", "answer") if key not in feature]
            if len(missing) == 2:
                raise ValueError(
                    f"Example {_example_id(feature, position)!r} reached LaReDataCollator without its data columns "
                    f"(it has only {sorted(feature)}): Trainer's remove_unused_columns=True (the default) dropped "
                    "every column the model's forward() does not name, e.g. 'messages' and 'answer'. Pass "
                    "TrainingArguments(remove_unused_columns=False), or use lare_hf.training.LaReTrainer, which "
                    "keeps the collator's columns."
                )
            if missing:
                raise ValueError(
                    f"Example {_example_id(feature, position)!r} lacks {missing}: the collator takes the normalised "
                    "examples of lare_hf.data.formats.load_records / records_from_dataset."
                )
        prompts = [feature["messages"] for feature in features]
        written = self.response_rationale or (lambda feature: feature.get("rationale"))
        answers = [
            response_text(str(feature["answer"]), written(feature), self.response_format) for feature in features
        ]
        rationales = self._rationales(features) if self.with_rationale else None
        images = [feature.get("image") for feature in features]
        if all(image is None for image in images):
            images = None

        batch = self.processor.build_training_inputs(
            prompts=prompts,
            answers=answers,
            images=images,
            rationales=rationales,
            num_latent_steps=self.num_latent_steps,
            max_answer_length=self.max_answer_length,
            max_rationale_length=self.max_rationale_length,
        )
        batch = dict(batch)
        if self.latent_step_targets is not None:
            self._add_latent_step_labels(batch, features)
        if self.window_targets is not None:
            batch["window_targets"] = self._window_targets(features)
        return batch

    def _supervised_steps(self, option: str) -> int:
        """K for an option that supervises the latent steps (there must be some)."""
        steps = self.processor.num_latent_steps if self.num_latent_steps is None else self.num_latent_steps
        if steps == 0:
            raise ValueError(f"{option} supervises latent steps, but num_latent_steps is 0.")
        return steps

    def _window_targets(self, features: list[dict[str, Any]]) -> torch.LongTensor:
        steps = self._supervised_steps("window_targets")
        targets = torch.full((len(features), steps), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            if feature.get("image") is None:
                continue
            cells = [int(cell) for cell in self.window_targets(feature)][:steps]
            targets[row, : len(cells)] = torch.tensor(cells, dtype=torch.long)
        return targets

    def _add_latent_step_labels(self, batch: dict[str, torch.Tensor], features: list[dict[str, Any]]) -> None:
        processor = self.processor
        tokenizer = processor.tokenizer
        steps = self._supervised_steps("latent_step_targets")
        m = processor.latent_tokens_per_step
        start_id = processor.latent_start_token_id
        for row, feature in enumerate(features):
            targets = list(self.latent_step_targets(feature))
            (columns,) = (batch["input_ids"][row] == start_id).nonzero(as_tuple=True)
            start = int(columns[0])
            for k, target in enumerate(targets[:steps], start=1):
                ids = tokenizer.encode(" " + str(target).strip(), add_special_tokens=False)
                batch["labels"][row, start + 1 + (k - 1) * m] = ids[0]


__all__ = ["DATA_COLUMNS", "REASONING_TEMPLATE", "RESPONSE_FORMATS", "LaReDataCollator", "response_text"]
