"""Training-data decontamination (Appendix B, "Data Decontamination Procedure"): `lare data decontaminate`.

The paper cleans Vision-R1-cold in two stages before stage IV: (a) exact question-answer matches with the training
splits of AI2D and ScienceQA are removed; (b) a sample whose CLIP-ViT-L/14 image embedding has a cosine similarity
above a threshold with any image of the benchmarks' test splits is removed as a near-duplicate (4,479 samples in
all). `decontaminate` does both against any `--against` files, with any vision encoder given as a local folder.

Choices of ours (the paper leaves them open; docs/decontamination.md):

* Text normalisation (`normalize_text`): Unicode NFKC, `casefold()`, the `<image>` placeholder dropped, whitespace
  runs collapsed to one space, ends stripped. Punctuation is kept: it carries content (decimals such as 3.5 vs 35,
  option letters "A." / "(A)", formulas), and "exact match" should only undo formatting, not merge different
  questions. The question is every turn before the answer, as the training reader builds it (reasoning records get
  their `choices` appended the same way), so train and against records are compared in one form.
* Image embedding (`ImageEmbedder`): a dual encoder (CLIP / SigLIP full checkpoint) gives `get_image_features`'s
  pooled, projected embedding -- the image embedding CLIP similarity is defined on; a vision-only model (e.g.
  `CLIPVisionModel`) gives its `pooler_output`, or the mean of the patch embeddings when it has none; a VLM
  checkpoint with a `vision_tower` (a LaRe checkpoint) gives the pooled output of its vision tower. Embeddings are
  L2-normalised, so the cosine similarity is a dot product.
* The paper's threshold value is blank in our copy: `--threshold` has no default.
* A sample is removed when its similarity is strictly above the threshold ("above a threshold").
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .formats import IMAGE_TOKEN, LaReRecords, load_records

logger = logging.getLogger(__name__)

RULES = ("text", "image")
OUTPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
REPORT_SUFFIX = ".decontamination.json"
NORMALISATION = "unicode NFKC, casefold, <image> dropped, whitespace collapsed, ends stripped; punctuation kept"
_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The form in which questions and answers are compared (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold().replace(IMAGE_TOKEN, " ")
    return _WHITESPACE.sub(" ", text).strip()


def question_answer_key(example: dict[str, Any]) -> tuple[str, str]:
    """(normalised question, normalised answer) of a normalised example of `LaReRecords`: the question is the text
    of every turn before the answer."""
    parts = []
    for message in example["messages"]:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(part["text"] for part in content if part.get("type") == "text")
    return normalize_text("\n".join(parts)), normalize_text(example["answer"])


@dataclass
class Item:
    """One sample of a data file as the decontamination sees it."""

    index: int  # row index in its source file
    id: str
    key: tuple[str, str]
    image: Image.Image | None


@dataclass
class Source:
    """An `--against` set: a records file (`load_records`) or `BENCHMARK=PATH` (the evaluation reader)."""

    spec: str
    path: str
    benchmark: str | None = None
    num_samples: int = 0
    num_images: int = 0
    text_keys: dict[tuple[str, str], str] = field(default_factory=dict)  # key -> id of its first sample


def parse_against(spec: str) -> Source:
    """`PATH` (training-format records) or `BENCHMARK=PATH` (a benchmark file, as `lare eval --benchmark` reads it)."""
    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        from ..evaluation.benchmarks import BENCHMARKS

        key = name.strip().lower().replace("-", "_")
        if key not in BENCHMARKS:
            raise ValueError(
                f"--against {spec!r}: {name!r} is not a benchmark ({', '.join(sorted(BENCHMARKS))}); pass a records "
                "file path, or BENCHMARK=PATH for a benchmark file."
            )
        return Source(spec=spec, path=path, benchmark=key)
    return Source(spec=spec, path=spec)


def _iter_records(records: LaReRecords) -> Iterator[Item]:
    for position in range(len(records)):
        example = records[position]
        yield Item(records.source_indices[position], example["id"], question_answer_key(example), example["image"])


def _iter_benchmark(source: Source) -> Iterator[Item]:
    from ..evaluation.benchmarks import get_benchmark

    samples = get_benchmark(source.benchmark).load(source.path)
    for index, sample in enumerate(samples):
        yield Item(index, sample.id, (normalize_text(sample.prompt), normalize_text(sample.answer)), sample.image)


def _batches(items: Iterator[Item], batch_size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class ImageEmbedder:
    """L2-normalised image embeddings of a local transformers vision model (module docstring: which output)."""

    def __init__(self, path: str, device: str | None = None):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

        import lare_hf  # noqa: F401  (registers the "lare" Auto classes, for a LaRe checkpoint's vision tower)

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"--vision {path} is not a local transformers model folder (no config.json); pass the folder of a "
                "CLIP / SigLIP checkpoint (e.g. CLIP-ViT-L/14, as the paper) or of a LaRe checkpoint."
            )
        config = AutoConfig.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder)
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError):
            self.processor = AutoProcessor.from_pretrained(folder).image_processor
        if hasattr(model, "vision_tower"):  # a VLM (LaRe, LLaVA): its vision encoder, pooled
            self.model, self.pooling = model.vision_tower, f"{config.model_type} vision_tower pooler_output"
            del model
        elif hasattr(model, "get_image_features"):  # a dual encoder (CLIP, SigLIP): the projected image embedding
            self.model, self.pooling = model, f"{config.model_type} get_image_features (pooled, projected)"
        else:
            self.model, self.pooling = model, f"{config.model_type} pooler_output (else mean of patch embeddings)"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(len(images), D) float32 unit vectors."""
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.device, next(self.model.parameters()).dtype)
        if hasattr(self.model, "get_image_features"):
            output = self.model.get_image_features(pixel_values=pixel_values)
        else:
            output = self.model(pixel_values=pixel_values)
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            pooled = output.last_hidden_state.mean(dim=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _embed(embedder: ImageEmbedder, batch: list[Item]) -> tuple[list[int], torch.Tensor | None]:
    """Positions in `batch` of the items with an image, and their embeddings."""
    positions = [i for i, item in enumerate(batch) if item.image is not None]
    if not positions:
        return positions, None
    return positions, embedder([batch[i].image for i in positions])


def _refuse_existing_file(path: Path, what: str, overwrite: bool) -> None:
    if path.is_dir():
        raise FileExistsError(f"{what} {path} is a folder; give a file path ({', '.join(OUTPUT_SUFFIXES)}).")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{what} {path} exists; nothing was written. Choose another path, or pass --overwrite to replace it."
        )


def report_path(output: str | os.PathLike) -> Path:
    """The JSON report written next to the output: `<output without suffix>.decontamination.json`."""
    output = Path(output)
    return output.with_name(output.stem + REPORT_SUFFIX)


def _json_row(row: dict, output: Path) -> str:
    """One raw row as JSON; the nulls the JSON reader fills in for keys a record lacks are left out again (the
    training reader reads a missing key and a null alike)."""
    try:
        return json.dumps({key: value for key, value in row.items() if value is not None}, ensure_ascii=False)
    except TypeError as error:  # embedded image bytes
        raise ValueError(
            f"--output {output}: the records hold values JSON cannot store ({error}), e.g. embedded image bytes; "
            "write a .parquet output instead."
        ) from None


def write_rows(records: LaReRecords, keep: list[int], output: Path) -> None:
    """The kept raw rows, unchanged, in the format of `output`'s suffix (.jsonl, .json: a list, .parquet)."""
    kept = records.dataset.select(keep)
    if output.suffix == ".parquet":
        kept.to_parquet(str(output))
        return
    lines = [_json_row(row, output) for row in kept]
    with open(output, "w", encoding="utf-8") as handle:
        if output.suffix == ".jsonl":
            handle.write("".join(line + "\n" for line in lines))
        else:
            handle.write("[\n" + ",\n".join(lines) + "\n]\n")


def decontaminate(
    train: str,
    against: list[str],
    output: str,
    vision: str | None = None,
    threshold: float | None = None,
    rules: tuple[str, ...] = RULES,
    image_folder: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    on_error: str = "raise",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `train` without its samples that match an `against` sample (module docstring); returns the report,
    also written as JSON next to `output` (`report_path`).

    Args:
        train: training records (any format of `load_records`: JSON / JSONL / parquet / save_to_disk).
        against: records files, or `BENCHMARK=PATH` for a benchmark file read as `lare eval` reads it.
        output: the cleaned file (.jsonl, .json or .parquet); rows are written unchanged.
        vision: a local transformers vision model folder (needed by the image rule).
        threshold: cosine similarity above which an image is a near-duplicate (needed by the image rule).
        rules: "text" (exact question-answer match) and / or "image" (embedding near-duplicate).
        image_folder: root of `train`'s relative image paths (default: its folder), as in training.
        on_error: malformed train records: "raise", or "skip" (left out of the output and listed in the report).
    """
    rules = tuple(rules)
    _check_arguments(train, against, output, vision, threshold, rules, batch_size, on_error)
    output_path = Path(output).expanduser()
    _refuse_existing_file(output_path, "--output", overwrite)
    _refuse_existing_file(report_path(output_path), "the report", overwrite)

    records = load_records(train, image_folder=image_folder, on_error=on_error)
    embedder = ImageEmbedder(vision, device) if "image" in rules else None
    sources = [parse_against(spec) for spec in against]
    against_embeddings, owners = _index_against(sources, embedder, rules, batch_size)

    removed: list[dict[str, Any]] = []
    keep: list[int] = []
    position = 0
    items = _iter_records(records)
    with tqdm(total=len(records), desc=f"decontaminating {Path(train).name}", unit="sample") as progress:
        for batch in _batches(items, batch_size):
            matches = _matches(batch, sources, embedder, against_embeddings, owners, threshold)
            for i, item in enumerate(batch):
                if matches[i]:
                    removed.append({"index": item.index, "id": item.id, "rules": sorted(matches[i]), **matches[i]})
                else:
                    keep.append(position + i)
            position += len(batch)
            progress.update(len(batch))

    output_path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(records, keep, output_path)
    report = _report(train, output_path, records, sources, removed, len(keep), vision, threshold, rules, embedder)
    report_file = report_path(output_path)
    report_file.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report["report"] = str(report_file)
    _note_relative_images(records, output_path)
    return report


def _matches(
    batch: list[Item],
    sources: list[Source],
    embedder: ImageEmbedder | None,
    against_embeddings: torch.Tensor | None,
    owners: list[tuple[str, str]],
    threshold: float | None,
) -> list[dict[str, Any]]:
    """For each train item, what it matches: {"text": {against, id}, "image": {against, id, similarity}} (either,
    both or neither)."""
    matches: list[dict[str, Any]] = [{} for _ in batch]
    for i, item in enumerate(batch):
        source = next((source for source in sources if item.key in source.text_keys), None)
        if source is not None:
            matches[i]["text"] = {"against": source.spec, "id": source.text_keys[item.key]}
    if embedder is None or against_embeddings is None:
        return matches
    positions, embeddings = _embed(embedder, batch)
    if positions:
        similarity, nearest = (embeddings @ against_embeddings.T).max(dim=1)
        for i, value, j in zip(positions, similarity.tolist(), nearest.tolist()):
            if value > threshold:
                source_spec, sample_id = owners[j]
                matches[i]["image"] = {"against": source_spec, "id": sample_id, "similarity": round(value, 6)}
    return matches


def _check_arguments(
    train: str,
    against: list[str],
    output: str,
    vision: str | None,
    threshold: float | None,
    rules: tuple[str, ...],
    batch_size: int,
    on_error: str,
) -> None:
    if not against:
        raise ValueError("--against needs at least one file to decontaminate against.")
    unknown = [rule for rule in rules if rule not in RULES]
    if unknown or not rules:
        raise ValueError(f"--rules {list(rules)}: each rule is one of {list(RULES)} (at least one).")
    if "image" in rules and (vision is None or threshold is None):
        raise ValueError(
            "The image rule needs --vision DIR (a local CLIP / SigLIP / LaRe folder) and --threshold T (a cosine "
            "similarity, e.g. 0.95); or pass --rules text for the exact question-answer rule only."
        )
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold {threshold} is not a cosine similarity; give a value in [-1, 1].")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1.")
    if Path(output).suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--output {output}: use a {', '.join(OUTPUT_SUFFIXES)} file name.")
    if Path(output).expanduser().resolve() == Path(train).expanduser().resolve():
        raise ValueError(f"--output {output} is the --train file itself; write the cleaned data to a new file.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"--on-error must be 'raise' or 'skip', got {on_error!r}.")


def _index_against(
    sources: list[Source], embedder: ImageEmbedder | None, rules: tuple[str, ...], batch_size: int
) -> tuple[torch.Tensor | None, list[tuple[str, str]]]:
    """Fill each source's text keys; return the embeddings of all `against` images and (source, id) of each row."""
    chunks: list[torch.Tensor] = []
    owners: list[tuple[str, str]] = []
    for source in sources:
        if source.benchmark is None:
            if not Path(source.path).expanduser().exists():
                raise FileNotFoundError(f"--against {source.spec} does not exist.")
            items = _iter_records(load_records(source.path))
        else:
            items = _iter_benchmark(source)
        with tqdm(desc=f"indexing {Path(source.path).name}", unit="sample") as progress:
            for batch in _batches(items, batch_size):
                source.num_samples += len(batch)
                if "text" in rules:
                    for item in batch:
                        source.text_keys.setdefault(item.key, item.id)
                if embedder is not None:
                    positions, embeddings = _embed(embedder, batch)
                    source.num_images += len(positions)
                    if embeddings is not None:
                        chunks.append(embeddings)
                        owners.extend((source.spec, batch[i].id) for i in positions)
                progress.update(len(batch))
    return (torch.cat(chunks) if chunks else None), owners


def _report(
    train: str,
    output: Path,
    records: LaReRecords,
    sources: list[Source],
    removed: list[dict[str, Any]],
    num_kept: int,
    vision: str | None,
    threshold: float | None,
    rules: tuple[str, ...],
    embedder: ImageEmbedder | None,
) -> dict[str, Any]:
    return {
        "procedure": "Appendix B data decontamination (lare data decontaminate)",
        "train": str(train),
        "output": str(output),
        "rules": list(rules),
        "text_normalisation": NORMALISATION if "text" in rules else None,
        "vision": None if embedder is None else str(vision),
        "embedding": None if embedder is None else embedder.pooling,
        "threshold": threshold if embedder is not None else None,
        "against": [
            {"spec": s.spec, "benchmark": s.benchmark, "num_samples": s.num_samples, "num_images": s.num_images}
            for s in sources
        ],
        "num_train": len(records) + records.num_skipped,
        "num_malformed_skipped": records.num_skipped,
        "num_kept": num_kept,
        "num_removed": len(removed),
        "removed_by_rule": {rule: sum(rule in entry["rules"] for entry in removed) for rule in rules},
        "removed": removed,
        "malformed_skipped": [{"index": index, "reason": reason} for index, reason in records.skipped],
    }


def _note_relative_images(records: LaReRecords, output: Path) -> None:
    """Rows are written unchanged: relative image paths stay relative to the train file's image folder."""
    root = records.image_root
    if root is None or output.parent.resolve() == root:
        return
    images = records.dataset["image"] if "image" in records.dataset.column_names else []
    if any(isinstance(value, str) and value and not os.path.isabs(value) for value in images):
        logger.warning(
            f"{output}: the image paths are relative to {root} (kept as in the train file); train with "
            f"--image_folder {root}."
        )


def summary(report: dict[str, Any]) -> str:
    """The printed summary of a report."""
    lines = [
        f"Removed {report['num_removed']} of {report['num_train']} samples "
        f"({', '.join(f'{rule}: {count}' for rule, count in report['removed_by_rule'].items())}); "
        f"kept {report['num_kept']} in {report['output']}."
    ]
    if report["num_malformed_skipped"]:
        lines.append(f"Skipped {report['num_malformed_skipped']} malformed records (not in the output).")
    for entry in report["removed"][:10]:
        why = []
        if "text" in entry:
            why.append(f"same question-answer as {entry['text']['against']}:{entry['text']['id']}")
        if "image" in entry:
            image = entry["image"]
            why.append(f"image cosine {image['similarity']:.4f} with {image['against']}:{image['id']}")
        lines.append(f"  - {entry['id']} (row {entry['index']}): {'; '.join(why)}")
    if report["num_removed"] > 10:
        lines.append(f"  ... and {report['num_removed'] - 10} more")
    lines.append(f"Report: {report['report']}")
    return "\n".join(lines)


__all__ = [
    "ImageEmbedder",
    "decontaminate",
    "normalize_text",
    "parse_against",
    "question_answer_key",
    "report_path",
    "summary",
]
