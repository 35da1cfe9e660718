"""Benchmark loaders, prompts, answer extraction and scoring on tiny hand-written files in the public layouts."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
from PIL import Image

from benchmark_files import image_dataset, png, write_mmbench, write_pope
from lare_hf.evaluation.benchmarks import (
    BENCHMARKS,
    MC_POST_PROMPT,
    POPE_ORIGINAL_POST_PROMPT,
    BenchmarkSample,
    extract_choice,
    extract_number,
    extract_yes_no,
    get_benchmark,
    parse_inline_options,
    parse_mmvp_options,
)

MC = "Answer with the option's letter from the given choices directly."


# ----------------------------------------------------------------------------------------------------------------
# extraction

OPEN_CLOSED = {"A": "Open", "B": "Closed"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("b", "B"),
        ("  b \n", "B"),
        ("The answer is B.", "B"),
        ("Answer: (b)", "B"),
        ("b) Closed", "B"),
        ("B. Closed", "B"),
        ("Closed", "B"),
        ("closed.", "B"),
        ("The answer is closed.", "B"),
        ("Option B", "B"),
        ("**Answer:** A", "A"),
        ("The door has a handle and a frame, so the answer is A.", "A"),
        ("<think>maybe A</think>B", "B"),
        ("A or B", ""),
        ("The answer is A or B.", ""),
        ("Both open and closed", ""),
        ("E", ""),
        ("", ""),
        ("I cannot tell.", ""),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, OPEN_CLOSED) == expected


@pytest.mark.parametrize(
    "text, choices, expected",
    [
        ("7", {"A": "3", "B": "7", "C": "1", "D": "9"}, "B"),
        ("Answer: 13", {"A": "3", "B": "7", "C": "1", "D": "9"}, ""),
        ("A dog is sitting on the sofa", {"A": "cat", "B": "dog"}, "B"),
        ("C", "ABCD", "C"),
        ("(d)", ["x", "y", "z", "w"], "D"),
        ("The suitcase is beneath the cat.", parse_inline_options("Options: A: on the cat, B: beneath the cat"), "B"),
    ],
)
def test_extract_choice_option_sets(text, choices, expected):
    assert extract_choice(text, choices) == expected


@pytest.mark.parametrize(
    "text, pope, strict",
    [
        ("Yes", "yes", "yes"),
        ("no.", "no", "no"),
        ("No, there is not.", "no", "no"),
        ("Yes, there is no doubt.", "yes", "yes"),
        ("There is a dog in the image.", "yes", ""),
        ("There isn't a dog.", "no", ""),
        ("There is not a dog in the image.", "no", ""),
        ("So the answer is no.", "no", "no"),
        ("", "", ""),
    ],
)
def test_extract_yes_no(text, pope, strict):
    assert extract_yes_no(text) == pope
    assert extract_yes_no(text, strict=True) == strict


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", "3"),
        ("The answer is 10.", "10"),
        ("seven", "7"),
        ("3 and 7", ""),
        ("It is 3. 3 + 7 = 10. So the answer is 10.", "10"),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_option_parsers():
    question = (
        "Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase is on the "
        "book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., D: The suitcase is beneath "
        "the book."
    )
    assert parse_inline_options(question) == {
        "A": "The suitcase is on the book.",
        "B": "The suitcase is beneath the cat.",
        "C": "The suitcase is beneath the bed.",
        "D": "The suitcase is beneath the book.",
    }
    assert parse_mmvp_options("(a) Open (b) Closed") == {"A": "Open", "B": "Closed"}


# ----------------------------------------------------------------------------------------------------------------
# MMBench


def test_mmbench_load_prompt_and_circular_score(tmp_path):
    write_mmbench(tmp_path / "en" / "dev-00000-of-00001.parquet")
    bench = get_benchmark("mmbench")
    samples = bench.load(tmp_path / "en")  # folder of Hub split files, default split "dev"
    assert [s.id for s in samples] == ["1", "1000001", "2000001", "2", "1000002", "3"]
    assert samples[5].prompt == f"A hint.\nQ3?\nA. one\nB. two\nC. three\nD. four\n{MC}"
    assert samples[3].prompt == f"Q2?\nA. red\nB. blue\n{MC}"  # None / NaN options and a "nan" hint dropped
    assert samples[3].choices == {"A": "red", "B": "blue"}
    assert samples[0].meta["l2_category"] == "perception"
    image = samples[1].image
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert image.getpixel((0, 0)) == (40, 0, 0)

    predictions = ["A", "The answer is D.", "cat", "B", "B", "(C) three"]  # question 2's shift is wrong
    metrics = bench.score(samples, predictions)
    assert metrics["plain_accuracy"] == pytest.approx(500 / 6)
    assert metrics["circular_accuracy"] == pytest.approx(200 / 3)
    assert metrics["accuracy"] == metrics["circular_accuracy"]
    assert metrics["num_questions"] == 3 and metrics["num_circular_questions"] == 2
    assert metrics["per_category"] == {"animals": 50.0, "counting": 100.0}
    assert metrics["per_l2_category"] == {"perception": 50.0, "reasoning": 100.0}
    rows = bench.judge(samples, predictions)
    assert [r["correct"] for r in rows] == [True, True, True, True, False, True]
    json.dumps([metrics, rows])


def test_split_selection_and_errors(tmp_path):
    write_mmbench(tmp_path / "dev-00000-of-00001.parquet")
    bench = get_benchmark("mmbench")
    with pytest.raises(ValueError, match="no data file for split 'test'"):
        bench.load(tmp_path, split="test")
    samples = bench.load(tmp_path / "dev-00000-of-00001.parquet", limit=2)
    assert len(samples) == 2
    with pytest.raises(ValueError, match="2 samples but 1 predictions"):
        bench.score(samples, ["A"])


def test_missing_column_is_a_clear_error(tmp_path):
    frame = pd.DataFrame({"index": [1], "question": ["Q?"], "A": ["x"], "B": ["y"], "category": ["c"]})
    frame["image"] = [{"bytes": png((0, 0, 0)), "path": None}]
    frame.to_parquet(tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match=r"needs column\(s\) 'answer'.*lmms-lab/MMBench"):
        get_benchmark("mmbench").load(tmp_path / "broken.parquet")
    with pytest.raises(FileNotFoundError):
        get_benchmark("mmbench").load(tmp_path / "missing.parquet")


def test_unknown_benchmark():
    with pytest.raises(ValueError) as error:
        get_benchmark("mmmu")
    names = {"mmbench", "mmstar", "mmvp", "scienceqa", "pope", "refocus_shapes", "refocus_chains"}
    for name in names:
        assert name in str(error.value)
    assert set(BENCHMARKS) == names
    assert get_benchmark("RefocusShapes".replace("Shapes", "-shapes")).name == "refocus_shapes"


# ----------------------------------------------------------------------------------------------------------------
# MMStar


def test_mmstar(tmp_path):
    questions = [
        "What is shown?\nOptions: A: a cat, B: a dog, C: a cow, D: a pig",
        "How many apples are there?\nOptions: A: 1, B: 2, C: 3, D: 11",
        "Which is red?\nOptions: A: the ball, B: the box",
    ]
    ds = image_dataset(
        {
            "index": [0, 1, 2],
            "question": questions,
            "answer": ["B", "D", "A"],
            "category": ["coarse perception", "math", "math"],
            "l2_category": ["image scene and topic", "numeric commonsense and calculation"] * 1 + ["geometry"],
            "meta_info": [{"source": "x", "split": "val", "image_path": "0.png"}] * 3,
        },
        [png((0, 0, 255))] * 3,
    )
    ds.to_parquet(str(tmp_path / "mmstar.parquet"))
    bench = get_benchmark("mmstar")
    samples = bench.load(tmp_path / "mmstar.parquet")
    assert samples[0].prompt == questions[0] + "\n" + MC
    assert samples[1].choices == {"A": "1", "B": "2", "C": "3", "D": "11"}
    assert samples[2].meta["l2_category"] == "geometry"
    metrics = bench.score(samples, ["a dog", "11", "The answer is (b)."])
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert metrics["per_category"] == {"coarse perception": 100.0, "math": 50.0}
    assert metrics["per_l2_category"]["geometry"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# MMVP


def test_mmvp_csv_with_image_folder_and_pair_accuracy(tmp_path):
    folder = tmp_path / "MMVP Images"
    folder.mkdir()
    for i in range(1, 5):
        Image.new("RGB", (8, 8), (0, i * 50, 0)).save(folder / f"{i}.jpg")
    pd.DataFrame(
        {
            "Index": [1, 2, 3, 4],
            "Question": ["Is the door open or closed?"] * 2 + ["Is the dog facing left or right?"] * 2,
            "Options": ["(a) Open (b) Closed"] * 2 + ["(a) Left (b) Right"] * 2,
            "Correct Answer": ["(a)", "(b)", "(b)", "(a)"],
        }
    ).to_csv(tmp_path / "Questions.csv", index=False)
    bench = get_benchmark("mmvp")
    samples = bench.load(tmp_path / "Questions.csv")
    assert samples[0].prompt == f"Is the door open or closed?\nA. Open\nB. Closed\n{MC}"
    assert [s.answer for s in samples] == ["A", "B", "B", "A"]
    assert samples[3].image.size == (8, 8)
    metrics = bench.score(samples, ["(a)", "b) Closed", "Right", "B"])
    assert metrics["accuracy"] == 75.0
    assert metrics["pair_accuracy"] == 50.0 and metrics["num_pairs"] == 2


def test_mmvp_parquet(tmp_path):
    ds = image_dataset(
        {
            "Index": [1, 2],
            "Question": ["Open or closed?"] * 2,
            "Options": ["(a) Open (b) Closed"] * 2,
            "Correct Answer": ["(a)", "(b)"],
        },
        [png((1, 2, 3)), png((4, 5, 6))],
    )
    ds.to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    samples = get_benchmark("mmvp").load(tmp_path)
    assert samples[1].image.getpixel((0, 0)) == (4, 5, 6)
    assert get_benchmark("mmvp").score(samples, ["A", "B"])["pair_accuracy"] == 100.0


# ----------------------------------------------------------------------------------------------------------------
# ScienceQA


def test_scienceqa_image_subset_from_save_to_disk(tmp_path):
    ds = datasets.Dataset.from_dict(
        {
            "image": [png((9, 9, 9)), None, png((7, 7, 7))],
            "question": ["Which is a mammal?", "Text only?", "Which state is farthest north?"],
            "choices": [["frog", "whale"], ["x", "y"], ["Utah", "Maine", "Texas"]],
            "answer": [1, 0, 1],
            "hint": ["", "", "Look at the map."],
            "subject": ["natural science", "language science", "social science"],
            "category": ["Classification", "Grammar", "Geography"],
            "grade": ["grade2", "grade3", "grade4"],
        }
    ).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "sqa"))
    bench = get_benchmark("scienceqa")
    samples = bench.load(tmp_path / "sqa")  # default split "test"; the text-only row is dropped
    assert len(samples) == 2
    assert samples[0].prompt == f"Which is a mammal?\nA. frog\nB. whale\n{MC}"
    assert (
        samples[1].prompt
        == f"Context: Look at the map.\nWhich state is farthest north?\nA. Utah\nB. Maine\nC. Texas\n{MC}"
    )
    assert [s.answer for s in samples] == ["B", "B"]
    metrics = bench.score(samples, ["B", "Texas"])
    assert metrics["accuracy"] == 50.0
    assert metrics["per_category"] == {"Classification": 100.0, "Geography": 0.0}
    assert metrics["per_subject"] == {"natural science": 100.0, "social science": 0.0}


# ----------------------------------------------------------------------------------------------------------------
# POPE


def test_pope_prompt_and_metrics(tmp_path):
    write_pope(tmp_path / "test-00000-of-00001.parquet")
    bench = get_benchmark("pope")
    samples = bench.load(tmp_path)
    assert samples[0].prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    original = get_benchmark("pope", post_prompt=POPE_ORIGINAL_POST_PROMPT).load(tmp_path)
    assert original[0].prompt == "Is there a dog in the image? Please answer this question with one word."

    predictions = ["Yes", "No, there is not.", "yes", "No", "There is a dog.", ""]
    metrics = bench.score(samples, predictions)  # extracted: yes no yes no yes ""
    assert metrics["accuracy"] == 50.0
    assert metrics["precision"] == pytest.approx(200 / 3)  # TP 2, FP 1
    assert metrics["recall"] == pytest.approx(200 / 3)  # FN 1
    assert metrics["f1"] == pytest.approx(200 / 3)
    assert metrics["yes_ratio"] == 50.0
    assert metrics["num_unanswered"] == 1
    adversarial = metrics["per_category_metrics"]["adversarial"]
    assert adversarial["accuracy"] == pytest.approx(100 / 3)
    assert adversarial["precision"] == adversarial["recall"] == adversarial["f1"] == 50.0
    random = metrics["per_category_metrics"]["random"]
    assert random["precision"] == random["recall"] == random["f1"] == 100.0
    assert random["yes_ratio"] == pytest.approx(100 / 3)
    assert metrics["per_category"] == {"adversarial": pytest.approx(100 / 3), "random": pytest.approx(200 / 3)}
    assert metrics["mean_over_categories"]["f1"] == 75.0
    json.dumps(metrics)  # the runner writes the report as JSON


def test_pope_rejects_bad_answers(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "cat.png")
    (tmp_path / "pope.jsonl").write_text(
        json.dumps({"question": "Is there a cat?", "answer": "maybe", "image": "cat.png"})
    )
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        get_benchmark("pope").load(tmp_path / "pope.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# RefocusShapes and the sample structure


def test_multiple_choice_prompt_is_the_one_training_asks(tmp_path, tiny_model_and_processor):
    """A reasoning record's multiple-choice question reaches the model as the same tokens in training (records ->
    `LaReDataCollator`) and in evaluation (the RefocusShapes benchmark -> `prompt_inputs`)."""
    from lare_hf.data import LaReDataCollator, load_records
    from lare_hf.evaluation.runner import prompt_inputs

    model, processor = tiny_model_and_processor
    (tmp_path / "board.png").write_bytes(png((200, 30, 30), 32))
    records = [
        {"id": "listed", "image": "board.png", "question": "Which shape is red?", "answer": "B",
         "choices": ["the circle", "the square", "the star"], "rationale": "The square is red."},
        {"id": "inline", "image": "board.png", "question": "Which shape is red? (A) the circle (B) the square",
         "answer": "A", "choices": ["the circle", "the square"], "rationale": "The circle is red."},
    ]  # fmt: skip
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    training = load_records(str(tmp_path / "test.jsonl"), kind="reasoning")
    samples = get_benchmark("refocus_shapes").load(tmp_path / "test.jsonl")
    assert samples[0].prompt == "Which shape is red?\nOptions:\nA. the circle\nB. the square\nC. the star"
    assert samples[1].prompt == records[1]["question"]  # options already spelled out: left as written
    collator = LaReDataCollator(
        processor=processor, num_latent_steps=2, with_rationale=False, response_format="answer"
    )
    for example, sample in zip(training, samples):
        batch = collator([example])
        answer_start = int((batch["labels"][0] != -100).nonzero().min())
        asked = prompt_inputs(model, processor, [sample], 2)
        assert batch["input_ids"][0, :answer_start].tolist() == asked["input_ids"][0].tolist()


def test_refocus_shapes_benchmark(tmp_path):
    from lare_hf.data.refocus_shapes import CATEGORIES, write_refocus_shapes

    write_refocus_shapes(tmp_path, num_train=0, num_test=14, seed=3)
    bench = get_benchmark("refocus_shapes")
    samples = bench.load(tmp_path)  # the folder write_refocus_shapes filled; split "test"
    assert len(samples) == 14
    records = [json.loads(line) for line in open(tmp_path / "test.jsonl")]
    assert [s.prompt for s in samples] == [r["question"] for r in records]
    assert samples[0].image.size == (64, 64)
    rationales = [r["rationale"] for r in records]  # every rationale ends in "So the answer is X."
    metrics = bench.score(samples, rationales)
    assert metrics["accuracy"] == 100.0 and metrics["num_pairs"] == 2 and metrics["pair_accuracy"] == 100.0
    assert set(metrics["per_category"]) == set(CATEGORIES)
    assert bench.score(samples, [""] * 14)["accuracy"] == 0.0
    mc = next(s for s in samples if s.choices)
    assert bench.extract(mc.choices[mc.answer], mc) == mc.answer  # the option's text alone
    yes_no = next(s for s in samples if s.answer in ("yes", "no"))
    assert bench.extract("7", yes_no) == ""  # strict: no yes/no word -> unanswered


def test_sample_accepts_images_in_several_forms(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "a.png")
    for source in (png((1, 2, 3), 4), {"bytes": None, "path": "a.png"}, "a.png", Image.new("L", (4, 4), 5)):
        sample = BenchmarkSample("x", source, "prompt", "A", image_root=tmp_path)
        assert sample.image.mode == "RGB" and sample.image.size == (4, 4)
    assert "image" not in repr(sample)
    assert BenchmarkSample("y", None, "p", "yes").image is None
    assert MC_POST_PROMPT == "\n" + MC


def test_mmbench_vlmevalkit_tsv_with_base64_images(tmp_path):
    import base64

    frame = pd.DataFrame(
        {
            "index": [7, 1000007],
            "question": ["Q?", "Q?"],
            "hint": [None, None],
            "A": ["x", "y"],
            "B": ["y", "x"],
            "answer": ["A", "B"],
            "category": ["c", "c"],
            "l2-category": ["l2", "l2"],
            "image": [base64.b64encode(png((3, 4, 5), 16)).decode()] * 2,
        }
    )
    frame.to_csv(tmp_path / "MMBench_DEV_EN.tsv", sep="\t", index=False)
    bench = get_benchmark("mmbench")
    samples = bench.load(tmp_path / "MMBench_DEV_EN.tsv")
    assert samples[0].prompt == f"Q?\nA. x\nB. y\n{MC}"
    assert samples[1].image.getpixel((0, 0)) == (3, 4, 5)
    assert bench.score(samples, ["A", "A"])["circular_accuracy"] == 0.0


def test_missing_image_file_fails_at_load(tmp_path):
    record = {"id": "r0", "image": "images/nope.png", "question": "What digit?", "answer": "3"}
    (tmp_path / "test.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(FileNotFoundError, match="image_folder"):
        get_benchmark("refocus_shapes").load(tmp_path / "test.jsonl")


REASONING_CASES = [  # (benchmark, gold answer, choices, the answer as the reasoning response states it)
    ("mmbench", "B", {"A": "a cat", "B": "a dog", "C": "a bird"}, "B"),
    ("mmstar", "C", {"A": "1", "B": "2", "C": "3", "D": "4"}, "C"),
    ("mmvp", "A", {"A": "open", "B": "closed"}, "(a) open"),
    ("scienceqa", "B", {"A": "solid", "B": "liquid"}, "B"),
    ("pope", "no", None, "no"),
    ("refocus_shapes", "7", None, "7"),
    ("refocus_chains", "blue", None, "the blue cell"),
]


@pytest.mark.parametrize("name, gold, choices, stated", REASONING_CASES, ids=[case[0] for case in REASONING_CASES])
def test_final_answer_is_extracted_from_a_reasoning_response(name, gold, choices, stated):
    """The paper's target: the model reasons in text first, then answers (collator response_format="reasoning")."""
    from lare_hf.evaluation.benchmarks import BenchmarkSample

    bench = get_benchmark(name)
    sample = BenchmarkSample(id="x", image=None, prompt="q", answer=gold, choices=choices)
    rationale = "First I look at the image. The first option is not it, the other is; there are 2 of them."
    assert bench.extract(f"{rationale}\nAnswer: {stated}", sample) == gold
    assert bench.is_correct(f"{rationale}\nAnswer: {stated}", sample)
