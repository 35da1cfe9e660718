"""Tokenizers for LaRe: the LaRe special tokens, and a tiny byte-level BPE tokenizer built fully offline.

`build_tiny_tokenizer` trains a byte-level BPE (Qwen2-style pre-tokenization, ChatML special tokens) on a small
English corpus embedded below. The trainer is a small pure-Python BPE with a fixed tie-break rule, so the vocabulary
and merges are identical in every run and every process (the `tokenizers` trainer breaks frequency ties through hash
maps, which is not guaranteed to be stable across processes). The result is wrapped into the transformers 5 fast
tokenizer (`PreTrainedTokenizerFast`, i.e. `TokenizersBackend`), which can encode any text (256 byte symbols).
"""

from __future__ import annotations

import functools
import heapq
from collections import defaultdict

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from ..modeling.components import add_lare_special_tokens
from ..modeling.configuration_lare import LARE_SPECIAL_TOKENS

ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
CHATML_SPECIAL_TOKENS = (ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# Qwen2's pre-tokenization: words with an optional leading non-letter, single digits, punctuation runs, newlines.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

_BASE_CORPUS = """\
You are a helpful assistant.
You are a helpful assistant that answers questions about images.
Look at the image carefully and answer the question.
Answer with the option's letter from the given choices directly.
Answer the question using a single word or phrase.
Please describe this image in detail.
What is shown in this picture?
What is in the image?
How many objects are there in the image?
How many people are wearing black?
Is there a cat in the image? Please answer yes or no.
Is there a dog in the image? Please answer yes or no.
Which digit is written inside the red square?
Which digit is inside the blue circle?
Which shape is to the left of the green triangle?
Which shape is above the yellow box?
What is the sum of the two digits?
Which number is larger?
Which number is smaller?
Which container holds the largest digit?
Options: A. red B. blue C. green D. yellow
Options:
A. circle
B. square
C. triangle
D. star
The answer is A.
The answer is B.
The answer is C.
The answer is D.
Yes, there is.
No, there is not.
Let me think step by step.
First, I find the red square in the image.
Then I look inside the square and read the digit.
The digit inside the red square is 7.
The digit inside the blue circle is 3.
The sum is 3 + 7 = 10.
So the answer is 10.
The larger number is 9 and the smaller number is 2.
The small box is below the large circle.
The triangle is on the right side of the image.
The circle is on the left side of the image.
The square is in the middle of the picture.
The objects are arranged in a row from left to right.
There are three shapes: a circle, a square and a triangle.
There are two people and one dog in the picture.
A man is standing next to a woman.
A cat is sitting on a table.
A red car is parked on the street.
The sky is blue and the grass is green.
The image shows a kitchen with a white table and four chairs.
The photo shows a room with a window, a lamp and a bed.
Focus on the region that contains the answer.
Zoom in on the top left corner of the image.
The text in the image says "stop".
The clock shows 3 o'clock.
It's a sunny day; the people are walking in the park.
I can't see any animals in this image.
We'll count the circles: 1, 2, 3, 4, 5.
There are 0 triangles, 1 square, 2 circles and 3 boxes.
Digits: 0 1 2 3 4 5 6 7 8 9.
Numbers: 10, 11, 12, 20, 25, 50, 100, 256, 1000.
Punctuation: . , ; : ! ? ' " ( ) [ ] { } - + = * / % & # @ $ _ < > | ~ ^ `
question: What color is the box? answer: red
question: What shape is on top? answer: circle
Reasoning: the blue circle is above the red square, so the answer is the circle.
Rationale: the largest digit is in the green container.
Hint: compare the sizes of the shapes.
Caption: a small yellow triangle next to a large purple square.
Caption: an orange circle inside a grey box.
True or false: the circle is larger than the square.
Correct answer: B
Final answer: 42
system
user
assistant
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is in the picture?<|im_end|>
<|im_start|>assistant
A dog playing with a ball.<|im_end|>
Describe the scene in one sentence.
Provide a short and accurate answer.
Explain your reasoning before giving the final answer.
Think about the question, then answer it.
Based on the image, which statement is true?
According to the chart, which month had the highest sales?
The bar chart compares the number of students in each class.
The table lists the price of each item in dollars.
The map shows the locations of several cities and rivers.
The diagram illustrates the life cycle of a butterfly.
Which of these animals is a mammal? A. frog B. whale C. shark D. snake
Which material is the most flexible? A. rubber B. glass C. stone D. wood
Which object is magnetic? A. a paper clip B. a wooden spoon C. a plastic cup D. a cotton shirt
Select the best answer to complete the sentence.
Identify the main object in the photograph.
Read the sign and tell me what it says.
How many apples are on the plate? There are five apples.
How many windows does the house have? The house has six windows.
What time is shown on the watch? It is half past two.
What is the weather like? It is cloudy and raining.
Where is the bicycle? The bicycle is leaning against the wall.
Who is holding the umbrella? The woman in the yellow coat.
Why is the boy smiling? Because he won the game.
When was the photo taken? It was taken at night.
What sport are they playing? They are playing football.
What animal is on the sofa? A sleeping cat.
What is the man doing? He is riding a horse along the beach.
What is the girl eating? She is eating an ice cream.
What vehicle is in front of the building? A bus.
What food is on the table? Bread, cheese, fruit and vegetables.
The children are playing in the garden near the tree.
A group of friends is sitting around a fire at the camp.
An old bridge crosses the river under a bright moon.
The mountain is covered with snow and the lake is frozen.
A train is arriving at the station and passengers are waiting.
The computer screen shows a website with pictures and text.
A person is cooking dinner in the kitchen with a pan.
Two birds are flying over the ocean at sunset.
The street is busy with cars, buses, bikes and people.
A plate with a sandwich, a glass of water and a knife.
The shelf holds books, boxes, bottles and a small plant.
The flowers in the vase are red, white and purple.
The baby is sleeping in a soft blue blanket.
The player throws the ball to his teammate.
The kitten is hiding behind the curtain.
The laptop is open on the desk next to a phone.
There is a sign with the word "open" on the door.
The building has a tall tower with a clock.
The boat is floating on calm water near the shore.
A woman wearing glasses is reading a newspaper.
The shadow of the tree falls across the road.
The first image and the second image are different.
Compare the two pictures and find the difference.
Count the number of visible wheels.
Look closer at the bottom right part of the image.
The important detail is very small and hard to see.
The model should attend to the relevant region before answering.
Visual reasoning requires looking at the right place at the right time.
The latent tokens summarize the selected window of visual features.
Each step refocuses on a new part of the image.
The question asks about the colour of the object in the corner.
I am not sure, but it looks like a bottle.
Sorry, I cannot determine that from the image.
Sure! Here is a detailed description of the image.
Certainly. The image contains several geometric shapes.
Great question. Let's analyze the picture together.
In summary, the correct choice is option C.
Therefore, the answer is no.
Hence, the result is twelve.
Because the circle is bigger, the answer is yes.
Although the box is red, the triangle inside it is blue.
If the digit is even, answer even; otherwise answer odd.
Even numbers: 0, 2, 4, 6, 8. Odd numbers: 1, 3, 5, 7, 9.
Multiply 3 by 4 to get 12, then subtract 5 to get 7.
Half of 10 is 5 and double of 6 is 12.
The difference between 9 and 4 is 5.
The total number of shapes is 8.
Top, bottom, left, right, center, corner, edge, middle.
First, second, third, fourth, last.
Big, bigger, biggest, small, smaller, smallest, tall, short, long, wide, narrow.
Light, dark, bright, pale, striped, dotted, solid, empty, full.
Up, down, inside, outside, between, behind, under, over, near, far.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
January, February, March, April, May, June, July, August, September, October, November, December.
Hello! How can I help you today?
Thank you for the picture. Here is my answer.
Please upload an image and ask a question about it.
Input: an image and a question. Output: a short answer.
Instruction: answer the question based on the image.
Context: the image shows a science experiment with two beakers.
Lecture: magnets can pull on some metals, such as iron and steel.
Solution: the liquid in the left beaker is warmer.
Question: Which beaker has more water? Options: (A) left (B) right
"""

_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "brown", "pink", "cyan")
_SHAPES = ("circle", "square", "triangle", "box", "container", "star", "rectangle", "diamond")
_RELATIONS = ("left of", "right of", "above", "below", "inside", "next to")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _generated_corpus() -> list[str]:
    """Deterministic template sentences (no randomness): colours x shapes x relations, digits, options."""
    lines = []
    for i, colour in enumerate(_COLOURS):
        shape = _SHAPES[i % len(_SHAPES)]
        other = _SHAPES[(i + 3) % len(_SHAPES)]
        other_colour = _COLOURS[(i + 5) % len(_COLOURS)]
        relation = _RELATIONS[i % len(_RELATIONS)]
        digit = i % 10
        lines.append(f"The {colour} {shape} is {relation} the {other_colour} {other}.")
        lines.append(f"Which digit is in the {colour} {shape}? The digit is {digit}.")
        lines.append(f"Is the {colour} {shape} {relation} the {other_colour} {other}? Answer yes or no. Yes.")
        lines.append(f"What colour is the {shape} {relation} the {other}? It is {colour}.")
    for shape in _SHAPES:
        for relation in _RELATIONS:
            lines.append(f"Which shape is {relation} the {shape}?")
    for d, word in enumerate(_DIGIT_WORDS):
        e = (d * 7 + 3) % 10
        bigger, smaller = max(d, e), min(d, e)
        lines.append(f"The digit {d} is written as {word}. {d} + {e} = {d + e}.")
        lines.append(f"Which is larger, {d} or {e}? The larger digit is {bigger}; the smaller one is {smaller}.")
    for i, letter in enumerate("ABCD"):
        lines.append(f"{letter}. {_COLOURS[i]} {_SHAPES[i]}")
        lines.append(f"Answer: {letter}")
        lines.append(f"The correct option is ({letter}).")
    return lines


def tiny_corpus() -> list[str]:
    """The English training corpus of the tiny tokenizer (a few hundred short lines)."""
    return _BASE_CORPUS.splitlines() + _generated_corpus()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (what `ByteLevel` pre-tokenization emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars]))


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _train_bpe(lines: list[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE training with a deterministic rule: merge the most frequent adjacent pair, ties broken by the
    lexicographically smallest pair. Returns (vocab: 256 byte symbols in byte order, then merges; merges)."""
    byte_symbols = [_bytes_to_unicode()[b] for b in range(256)]
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}

    pre_tokenizer = _pre_tokenizer()
    normalizer = normalizers.NFC()
    word_counts: dict[str, int] = defaultdict(int)
    for line in lines:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            word_counts[piece] += 1
    words = [list(word) for word in sorted(word_counts)]
    counts = [word_counts[word] for word in sorted(word_counts)]

    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += counts[index]
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count or negative_count == 0:
            continue  # stale heap entry
        merged = pair[0] + pair[1]
        merges.append(pair)
        vocab[merged] = len(vocab)
        changed: set[tuple[str, str]] = set()
        for index in sorted(pair_words.pop(pair)):
            symbols, count = words[index], counts[index]
            for old in zip(symbols, symbols[1:]):
                pair_counts[old] -= count
                changed.add(old)
            new_symbols, position = [], 0
            while position < len(symbols):
                if position + 1 < len(symbols) and (symbols[position], symbols[position + 1]) == pair:
                    new_symbols.append(merged)
                    position += 2
                else:
                    new_symbols.append(symbols[position])
                    position += 1
            words[index] = new_symbols
            for new in zip(new_symbols, new_symbols[1:]):
                pair_counts[new] += count
                pair_words[new].add(index)
                changed.add(new)
        pair_counts.pop(pair, None)
        for changed_pair in sorted(changed):
            count = pair_counts.get(changed_pair, 0)
            if count > 0:
                heapq.heappush(heap, (-count, changed_pair))
            else:
                pair_counts.pop(changed_pair, None)
    return vocab, merges


@functools.lru_cache(maxsize=8)
def _trained_bpe(num_merges: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    vocab, merges = _train_bpe(tiny_corpus(), num_merges)
    return tuple(vocab.items()), tuple(merges)


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A small byte-level BPE chat tokenizer (Qwen2.5-style ChatML), built offline and deterministically.

    Id layout: 0-255 the byte symbols (in byte order), then the BPE merges, then `<|endoftext|>`, `<|im_start|>`,
    `<|im_end|>`, `<|image|>`, `<|latent_start|>`, `<|latent|>`, `<|latent_end|>` (the last seven ids), so
    `len(tokenizer) == vocab_size` (as long as the embedded corpus supports that many merges).
    eos = `<|im_end|>`, pad = `<|endoftext|>`, padding_side = "left", no BOS.
    """
    num_special = len(CHATML_SPECIAL_TOKENS) + len(LARE_SPECIAL_TOKENS)
    if vocab_size < 256 + num_special:
        raise ValueError(
            f"vocab_size must be at least {256 + num_special} (256 bytes + {num_special} special tokens)."
        )
    vocab_items, merges = _trained_bpe(vocab_size - 256 - num_special)
    backend = Tokenizer(
        BPE(
            vocab=dict(vocab_items),
            merges=list(merges),
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CHATML_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        unk_token=None,
        bos_token=None,
        padding_side="left",
        model_max_length=32768,
        extra_special_tokens=dict(LARE_SPECIAL_TOKENS),
    )
    # `<|im_start|>` has no named attribute; list it so it counts as special (`all_special_ids`, decoding).
    tokenizer.add_special_tokens({"extra_special_tokens": [IM_START_TOKEN]}, replace_extra_special_tokens=False)
    add_lare_special_tokens(tokenizer)
    return tokenizer


__all__ = [
    "CHATML_SPECIAL_TOKENS",
    "LARE_SPECIAL_TOKENS",
    "add_lare_special_tokens",
    "build_tiny_tokenizer",
    "tiny_corpus",
]
