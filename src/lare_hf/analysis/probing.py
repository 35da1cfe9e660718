"""Probing (Table 6): do the latent tokens encode the visual evidence and the reasoning text?

The paper's protocol (Appendix, "Settings of Probing Analysis"):

* pooled latents Z, pooled rationale representations T (the LM's hidden states of the rationale text) and pooled
  window features V (the visual tokens under the steps' windows), all with the training's mean-max pooling
  (`mean_max_pool`, as in L_sym, Eq. 6);
* each projected to 256 dimensions by a trainable linear layer and L2-normalised;
* 1,000 labelled pairs (latent of sample i, partner of sample j), 500 positive (j = i) and 500 negative, the
  negatives balanced over three kinds: (i) same image, different question; (ii) same question, different image;
  (iii) random in-batch negatives (another sample of the feature-extraction batch, `batch_size` samples);
* a 70/30 train/test split stratified by pair kind;
* a linear SVM (C chosen by 5-fold cross-validation on the training pairs) and a one-hidden-layer MLP (Adam, early
  stopping on validation loss); the reported figure is test accuracy, for latent-vision and latent-text pairs.

Decisions the paper leaves open (ours): the two projections are trained with the symmetric InfoNCE of Eq. 6 on the
positive training pairs only, then frozen; a pair is classified from ``[z * p, |z - p|]`` of its two projected
vectors. A negative kind that has no candidate for a drawn sample (e.g. data where no two questions share an
image) is replaced by a random in-batch negative, and the report counts the replacements per kind
(`negatives_substituted`) and warns: the kinds are then not balanced as the paper's are.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..modeling.losses import mean_max_pool, symmetric_info_nce
from .common import check_steps, load_model, pyplot, save_figure

PROJECTION_DIM = 256
NEGATIVE_KINDS = ("same_image", "same_question", "random")
PAIR_KINDS = ("positive",) + NEGATIVE_KINDS


def image_key(image: Image.Image) -> str:
    """A content hash of an image: samples that share an image share the key."""
    rgb = image.convert("RGB")
    return hashlib.sha1(rgb.tobytes() + str(rgb.size).encode()).hexdigest()


def records_for_probing(records) -> list[dict[str, Any]]:
    """`{"image", "question", "rationale"}` per record of `lare_hf.data.formats.load_records` (reasoning records
    with a rationale)."""
    found = []
    for record in records:
        if not record.get("rationale"):
            raise ValueError(f"Record {record.get('id')!r} has no rationale; probing pairs latents with rationales.")
        texts = [part["text"] for part in record["messages"][0]["content"] if part.get("type") == "text"]
        found.append({"image": record["image"], "question": " ".join(texts), "rationale": record["rationale"]})
    return found


def refocus_chains_probe_records(path: str | Path, hops: Sequence[int] = (1, 2, 3, 4), limit: int | None = None):
    """RefocusChains boards of a JSONL file (`write_refocus_chains`), each asked with every chain length in `hops`
    from its question's start cell: one image with several questions, so that "same image, different question"
    negatives exist (each test record has its own board)."""
    from ..data.refocus_chains import QUESTION_TEMPLATE, follow

    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    for row in rows[:limit]:
        board = json.loads(row["board"]) if isinstance(row["board"], str) else row["board"]
        marks = dict(zip(board["cells"], board["marks"]))
        start = row["rationale"].removeprefix("path:").split()[0]
        with Image.open(path.parent / row["image"]) as opened:
            image = opened.convert("RGB")
        for h in hops:
            records.append(
                {
                    "image": image,
                    "question": QUESTION_TEMPLATE.format(start=start, hops=h, marks="mark" if h == 1 else "marks"),
                    "rationale": "path: " + " ".join(follow(marks, start, h)),
                }
            )
    if not records:
        raise ValueError(f"{path} holds no RefocusChains record.")
    return records


@torch.no_grad()
def probe_features(
    model, processor, records: list[dict[str, Any]], num_latent_steps: int | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """Mean-max pooled latents, window features and rationale hidden states `[N, 2 D]` of `records`
    (`{"image", "question", "rationale"}`), as the symmetric alignment loss (Eq. 6) pools them, plus each record's
    image key and question (for the negative kinds)."""
    steps = processor.num_latent_steps if num_latent_steps is None else num_latent_steps
    check_steps(model, steps)
    if steps == 0:
        raise ValueError("Probing needs latent tokens: num_latent_steps must be >= 1.")
    latents, windows, rationales = [], [], []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        messages = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}] for r in batch
        ]
        inputs = processor.build_training_inputs(
            prompts=messages,
            answers=[""] * len(batch),
            images=[r["image"] for r in batch],
            rationales=[r["rationale"] for r in batch],
            num_latent_steps=steps,
        ).to(model.device)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        pixel_values=inputs["pixel_values"])  # fmt: skip
        size = len(batch)
        latents.append(mean_max_pool(outputs.latent_embeds.reshape(size, -1, outputs.latent_embeds.shape[-1])))
        windows.append(mean_max_pool(outputs.window_features.reshape(size, -1, outputs.window_features.shape[-1])))
        hidden = model.model.language_model(
            input_ids=inputs["rationale_input_ids"], attention_mask=inputs["rationale_attention_mask"], use_cache=False
        ).last_hidden_state
        rationales.append(mean_max_pool(hidden, inputs["rationale_attention_mask"]))
    return {
        "latents": torch.cat(latents).cpu().numpy(),
        "vision": torch.cat(windows).cpu().numpy(),
        "text": torch.cat(rationales).cpu().numpy(),
        "image_ids": [image_key(r["image"]) for r in records],
        "question_ids": [r["question"] for r in records],
    }


def build_probe_pairs(
    image_ids: Sequence[Any],
    question_ids: Sequence[Any],
    num_pairs: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Half positive pairs (i, i) over distinct samples, half negatives (i, j) balanced over `NEGATIVE_KINDS`.
    "random" negatives are in-batch, as in the paper: j is another sample of i's batch of `batch_size` consecutive
    samples (None: any other sample). A kind with no candidate j for a drawn sample is replaced by a random in-batch
    negative. Returns `latent`, `partner` (indices), `label` (1 / 0), `kind` and `substituted` (per pair, the kind it
    replaces, or "") arrays."""
    count = len(image_ids)
    if len(question_ids) != count or count < 4:
        raise ValueError(
            f"Probing needs image_ids and question_ids for the same >= 4 samples, got {count} / {len(question_ids)}."
        )
    if num_pairs < 20:
        raise ValueError(f"num_pairs must be >= 20 (the SVM's 5-fold cross-validation needs it), got {num_pairs}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2):
        raise ValueError(
            f"batch_size (the in-batch negatives' batch) must be an integer >= 2 or None, got {batch_size!r}."
        )
    rng = np.random.default_rng(seed)
    batches = np.arange(count) // (batch_size or count)
    images, questions = np.asarray([str(v) for v in image_ids]), np.asarray([str(v) for v in question_ids])
    num_positive = min(num_pairs // 2, count)
    pairs = [(int(i), int(i), 1, "positive") for i in rng.permutation(count)[:num_positive]]
    seen = {(i, j) for i, j, _, _ in pairs}
    candidates = {
        "same_image": lambda i: np.flatnonzero((images == images[i]) & (questions != questions[i])),
        "same_question": lambda i: np.flatnonzero((questions == questions[i]) & (images != images[i])),
        "random": lambda i: np.flatnonzero((np.arange(count) != i) & (batches == batches[i])),
    }
    wanted = [NEGATIVE_KINDS[n % len(NEGATIVE_KINDS)] for n in range(num_positive)]
    substituted = [""] * len(pairs)
    for kind in wanted:
        replaces = ""
        for _ in range(100):  # a few draws to find a new pair; then a random in-batch negative, counted
            i = int(rng.integers(count))
            options = candidates[kind](i)
            options = [int(j) for j in options if (i, int(j)) not in seen]
            if options:
                j = options[int(rng.integers(len(options)))]
                break
        else:
            kind, replaces = "random", kind
            for _ in range(100):
                i = int(rng.integers(count))
                options = [int(j) for j in candidates["random"](i) if (i, int(j)) not in seen]
                if options:
                    break
            if not options:
                continue
            j = options[int(rng.integers(len(options)))]
        seen.add((i, j))
        pairs.append((i, j, 0, kind))
        substituted.append(replaces)
    latent, partner, label, kind = zip(*pairs)
    return {
        "latent": np.array(latent),
        "partner": np.array(partner),
        "label": np.array(label),
        "kind": np.array(kind),
        "substituted": np.array(substituted),
    }


def _train_projections(latents: torch.Tensor, partners: torch.Tensor, seed: int, epochs: int = 200):
    """The two trainable 256-d linear projections (+ L2 norm), fitted with symmetric InfoNCE on matching rows."""
    torch.manual_seed(seed)
    latent_projection = torch.nn.Linear(latents.shape[1], PROJECTION_DIM)
    partner_projection = torch.nn.Linear(partners.shape[1], PROJECTION_DIM)
    parameters = list(latent_projection.parameters()) + list(partner_projection.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = symmetric_info_nce(latent_projection(latents), partner_projection(partners), 0.07)
        loss.backward()
        optimizer.step()

    def project(layer, values):
        with torch.no_grad():
            return torch.nn.functional.normalize(layer(values), dim=-1)

    return lambda values: project(latent_projection, values), lambda values: project(partner_projection, values)


def mlp_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0, hidden: int = 256,
    max_epochs: int = 500, patience: int = 20,
) -> np.ndarray:  # fmt: skip
    """One-hidden-layer MLP (PyTorch, Adam), early stopping on the loss of a stratified 15% validation part of the
    training pairs (the weights of the best validation loss are kept); returns the predicted labels of `test_x`."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    fit_x, val_x, fit_y, val_y = train_test_split(
        train_x, train_y, test_size=0.15, stratify=train_y, random_state=seed
    )
    scaler = StandardScaler().fit(fit_x)
    fit_x, val_x, test_x = (torch.tensor(scaler.transform(x), dtype=torch.float32) for x in (fit_x, val_x, test_x))
    fit_y, val_y = torch.tensor(fit_y, dtype=torch.float32), torch.tensor(val_y, dtype=torch.float32)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(fit_x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best, best_state, waited = float("inf"), None, 0
    for _ in range(max_epochs):
        optimizer.zero_grad()
        loss_fn(net(fit_x).squeeze(-1), fit_y).backward()
        optimizer.step()
        with torch.no_grad():
            val_loss = float(loss_fn(net(val_x).squeeze(-1), val_y))
        if val_loss < best - 1e-5:
            best, best_state, waited = val_loss, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= patience:
                break
    net.load_state_dict(best_state)
    with torch.no_grad():
        return (net(test_x).squeeze(-1) > 0).long().numpy()


def svm_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Linear SVM (standardised features), C chosen by stratified 5-fold cross-validation on the training pairs;
    returns the predicted labels of `test_x` and the chosen C with its cross-validation accuracy (on the pairs the
    projections were fitted on, so optimistic: the test accuracy is the probe's figure)."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    search = GridSearchCV(
        make_pipeline(StandardScaler(), LinearSVC(dual="auto", max_iter=5000, random_state=seed)),
        {"linearsvc__C": [0.01, 0.1, 1.0, 10.0]},
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
    )
    search.fit(train_x, train_y)
    return search.predict(test_x), {
        "C": search.best_params_["linearsvc__C"],
        "cv_accuracy": 100.0 * float(search.best_score_),
    }


def run_probes(
    latents: np.ndarray,
    partners: np.ndarray,
    image_ids: Sequence[Any],
    question_ids: Sequence[Any],
    num_pairs: int = 1000,
    seed: int = 0,
    shuffle_labels: bool = False,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The protocol above for one partner modality: pairs, stratified 70/30 split, projections, SVM and MLP test
    accuracy (percent, overall and per pair kind). `shuffle_labels` permutes the pair labels first (a control: the
    probes must then be at chance). `batch_size`: the batches of the in-batch "random" negatives."""
    from sklearn.model_selection import train_test_split

    if len(latents) != len(partners):
        raise ValueError(f"latents ({len(latents)}) and partners ({len(partners)}) must have one row per sample.")
    pairs = build_probe_pairs(image_ids, question_ids, num_pairs, seed, batch_size)
    replaced, replaced_counts = np.unique(pairs["substituted"][pairs["substituted"] != ""], return_counts=True)
    negatives_substituted = dict(zip(replaced.tolist(), replaced_counts.tolist()))
    if negatives_substituted:
        warnings.warn(
            f"Probing: {negatives_substituted} negatives of these kinds had no candidate pair in the data and were "
            "drawn as random in-batch negatives instead; the negative kinds are not balanced as in the paper.",
            stacklevel=2,
        )
    labels = pairs["label"].copy()
    if shuffle_labels:
        labels = np.random.default_rng(seed + 1).permutation(labels)
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=0.3, stratify=pairs["kind"], random_state=seed)
    fewest = min(int((labels[train] == value).sum()) for value in (0, 1))
    if fewest < 5:
        raise ValueError(
            f"The training pairs hold only {fewest} of one label; 5-fold cross-validation needs >= 5 of each. Use "
            f"more samples or a larger num_pairs (got {num_pairs} pairs over {len(latents)} samples)."
        )
    latents_t = torch.tensor(np.asarray(latents), dtype=torch.float32)
    partners_t = torch.tensor(np.asarray(partners), dtype=torch.float32)
    positives = train[labels[train] == 1]
    project_latent, project_partner = _train_projections(
        latents_t[pairs["latent"][positives]], partners_t[pairs["partner"][positives]], seed
    )
    z, p = project_latent(latents_t[pairs["latent"]]), project_partner(partners_t[pairs["partner"]])
    features = torch.cat([z * p, (z - p).abs()], dim=-1).numpy()
    svm_predicted, svm_search = svm_probe(features[train], labels[train], features[test], seed)
    mlp_predicted = mlp_probe(features[train], labels[train], features[test], seed)

    def accuracy(predicted: np.ndarray) -> dict[str, Any]:
        correct = predicted == labels[test]
        by_kind = {
            k: 100.0 * float(correct[pairs["kind"][test] == k].mean())
            for k in PAIR_KINDS
            if (pairs["kind"][test] == k).any()
        }
        return {"accuracy": 100.0 * float(correct.mean()), "by_kind": by_kind}

    kinds, counts = np.unique(pairs["kind"], return_counts=True)
    return {
        "svm": {**accuracy(svm_predicted), **svm_search},
        "mlp": accuracy(mlp_predicted),
        "num_pairs": len(labels),
        "num_train": len(train),
        "num_test": len(test),
        "pair_kinds": dict(zip(kinds.tolist(), counts.tolist())),
        "negatives_substituted": negatives_substituted,
        "shuffled_labels": shuffle_labels,
    }


def probing_analysis(
    model,
    processor,
    records: list[dict[str, Any]],
    num_latent_steps: int | None = None,
    num_pairs: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Table 6 for one model: latent-vision and latent-text probing accuracy of the SVM and the MLP."""
    features = probe_features(model, processor, records, num_latent_steps, batch_size)
    report: dict[str, Any] = {
        "analysis": "probing",
        "num_records": len(records),
        "num_latent_steps": processor.num_latent_steps if num_latent_steps is None else num_latent_steps,
        "use_extractor": bool(model.config.use_extractor),
    }
    for modality in ("vision", "text"):
        report[modality] = run_probes(
            features["latents"], features[modality], features["image_ids"], features["question_ids"], num_pairs, seed,
            batch_size=batch_size,
        )  # fmt: skip
    return report


def probe_records(
    data: str, hops: Sequence[int] = (1, 2, 3, 4), limit: int | None = None, image_folder: str | None = None
) -> list[dict[str, Any]]:
    """The records `lare analyze probing` probes: from a RefocusChains JSONL file (rows with a ``board``) every board
    asked with each of `hops`; otherwise reasoning records (`load_records`) with their rationales."""
    from ..data.formats import load_records

    path = Path(data)
    if path.is_file() and path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "board" in row and "rationale" in row:
            return refocus_chains_probe_records(path, hops, limit)
    loaded = load_records(data, kind="reasoning", image_folder=image_folder)
    count = len(loaded) if limit is None else min(len(loaded), limit)
    return records_for_probing([loaded[i] for i in range(count)])


def run(
    model: str,
    data: str,
    output: Path,
    baseline: str | None = None,
    hops: Sequence[int] = (1, 2, 3, 4),
    limit: int | None = None,
    image_folder: str | None = None,
    device: str | None = None,
    num_latent_steps: int | None = None,
    num_pairs: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """`lare analyze probing`: Table 6 for the checkpoint `model` and, when given, the `baseline` checkpoint (the
    model without the Extractor), on `probe_records` of `data`, and their figure (``probing.png`` in `output`)."""
    records = probe_records(data, hops, limit, image_folder)
    reports = {}
    for name, model_dir in (("lare", model), ("baseline", baseline)):
        if model_dir is None:
            continue
        loaded, processor = load_model(model_dir, device)
        reports[name] = probing_analysis(loaded, processor, records, num_latent_steps, num_pairs, seed, batch_size)
        reports[name]["model"] = str(model_dir)
    figure = plot_probing(
        {
            f"{Path(r['model']).name} ({'with' if r['use_extractor'] else 'w/o'} Extractor)": r
            for r in reports.values()
        },
        output / "probing.png",
    )
    return {
        "analysis": "probing",
        "model": str(model),
        "baseline_model": None if baseline is None else str(baseline),
        "data": str(data),
        **reports,
        "figure": figure,
    }


__all__ = [
    "NEGATIVE_KINDS",
    "PROJECTION_DIM",
    "build_probe_pairs",
    "image_key",
    "mlp_probe",
    "plot_probing",
    "probe_features",
    "probing_analysis",
    "records_for_probing",
    "refocus_chains_probe_records",
    "run_probes",
    "svm_probe",
]


def plot_probing(reports: dict[str, dict[str, Any]], path: str | Path) -> str:
    """Grouped bars (Table 6): test accuracy of the SVM and MLP probes, latent-vision and latent-text, per model."""
    plt = pyplot()

    groups = [(modality, probe) for modality in ("vision", "text") for probe in ("svm", "mlp")]
    fig, axis = plt.subplots(figsize=(5.4, 3.4))
    width = 0.8 / max(1, len(reports))
    for n, (name, report) in enumerate(reports.items()):
        values = [report[modality][probe]["accuracy"] for modality, probe in groups]
        axis.bar(np.arange(len(groups)) + n * width, values, width, label=name)
    axis.axhline(50, color="grey", linestyle=":", linewidth=1)
    axis.set_xticks(np.arange(len(groups)) + width * (len(reports) - 1) / 2, [f"{m}\n{p.upper()}" for m, p in groups])
    axis.set_ylim(0, 118)
    axis.set_yticks(range(0, 101, 20))
    axis.set_ylabel("probe test accuracy (%)")
    axis.set_title("Probing the latents (chance = 50%)", fontsize=9)
    axis.legend(fontsize=7, loc="upper center", ncol=2)
    return save_figure(fig, path)
