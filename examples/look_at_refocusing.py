"""Chat with a LaRe checkpoint and save a picture of where each latent step refocused.

python examples/look_at_refocusing.py --model DIR --image scene.png --question "Which digit is in the red square?"
"""

import argparse

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import lare_hf  # noqa: F401  (registers the Auto classes)
from lare_hf.visualization import render_refocus

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--image", required=True)
parser.add_argument("--question", required=True)
parser.add_argument("--output", default="refocus.png")
args = parser.parse_args()

model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
processor = AutoProcessor.from_pretrained(args.model)
image = Image.open(args.image).convert("RGB")
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
with torch.no_grad():
    answer_ids = model.generate(**inputs, max_new_tokens=32)
    refocus = model(**inputs)  # the same latent loop, with its records: saliency maps and windows
answer = processor.batch_decode(answer_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
print("answer:", answer.strip())
print("windows (row, col) per step:", refocus.window_positions[0].tolist())
size = model.config.vision_config.image_size
strip = render_refocus(
    image.resize((size, size)), refocus.saliency_maps[0], refocus.window_positions[0], model.config.window_size
)
strip.save(args.output)
print("saved", args.output)
