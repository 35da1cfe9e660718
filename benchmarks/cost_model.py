"""FLOPs and memory of LaRe at the presets' real dimensions, measured on fake tensors (issue 29, item 1).

The model is built from the preset's fields alone, with no weights: its parameters are `FakeTensor`s (shapes and
dtypes, no storage), so the 7B preset costs no memory. One training step (forward + backward, every loss: L_ntp,
L_sym, L_img with the U-Net + KL-16, L_text) and one generation (prompt of 256 image tokens + a question, the
latent phase, 64 decode steps) run under `torch.utils.flop_counter.FlopCounterMode`, with LaRe (K steps) and K=0
side by side. Token ids, masks and pixels stay real tensors, so the model's data-dependent checks on them run
as usual; only boolean-mask indexing of a fake tensor by a real mask is rewritten into the equal integer indexing
(`RealMaskIndexing`), since a fake tensor cannot know how many rows a mask keeps.

FLOPs per component: FlopCounterMode's per-module breakdown attributes backward FLOPs to whichever module's
backward hook fired last (leaf modules such as dropout collect most of the backward), so the component of every op
is tracked here instead: forward ops by the component module they run in, backward ops by the component whose
forward created the autograd node (a pre-hook on each node). The components' total equals FlopCounterMode's total
(checked at run time). Components: vision tower, projector, LM prefill (the prompt up to <|latent_start|>; with K=0
the whole sequence), latent phase (the LM calls that feed latent slots, including the last one that also feeds
<|latent_end|> and, in training, the teacher-forced answer), Extractor, U-Net + KL-16, LM for losses (the LM passes
over the rationale for L_Z<->T and L_text), heads (lm_head, alignment head, the losses), decoding.

Memory: parameter bytes (trainable / frozen) and the bytes autograd saves for backward during the step
(`torch.autograd.graph.saved_tensors_hooks`, parameters excluded), with and without gradient checkpointing. With
checkpointing the tensors saved inside checkpointed layers are not kept (they are recomputed in backward); the
layer inputs that the checkpoints hold are not counted either, nor the transient peak of one layer's recompute.

The Qwen2.5 and CLIP-ViT-L/14 dimensions are those of the components' published config.json files (the presets
name the components; nothing is downloaded).

    python benchmarks/cost_model.py --preset lare-1.5b [--batch 1] [--k 4] [--plot docs/cost_model.png]
    python benchmarks/cost_model.py --preset lare-0.5b lare-1.5b lare-7b --plot docs/cost_model.png
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import defaultdict

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from lare_hf import LaReConfig, LaReForConditionalGeneration
from lare_hf.build import load_preset

CLIP_VIT_L_14 = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768,
)  # fmt: skip
QWEN25 = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False),
}  # fmt: skip
COMPONENTS = ("vision tower", "projector", "LM prefill", "latent phase", "Extractor", "U-Net + KL-16",
              "LM for losses", "heads", "decoding")  # fmt: skip
IMAGE, START, SLOT, END = 1000, 1001, 1002, 1003
QUESTION_TOKENS, ANSWER_TOKENS, RATIONALE_TOKENS, NEW_TOKENS = 20, 16, 48, 64


def preset_config(preset_name: str, num_latent_steps: int) -> LaReConfig:
    """The LaReConfig of a preset: its model fields, with the vision / text configs of its named components."""
    preset = load_preset(preset_name)
    fields = dict(preset["model"])
    if "text_config" not in fields:
        fields["vision_config"] = dict(CLIP_VIT_L_14)
        fields["text_config"] = dict(model_type="qwen2", **QWEN25[preset["components"]["text"]])
    for key in ("reconstructor_config", "image_tokenizer_config"):
        if fields.get(key) == "tiny":
            from lare_hf.modeling import reconstruction

            fields[key] = dict(getattr(reconstruction, f"TINY_{key.split('_config')[0].upper()}_CONFIG"))
    fields["num_latent_steps"] = num_latent_steps
    return LaReConfig(
        image_token_id=IMAGE, latent_start_token_id=START, latent_token_id=SLOT, latent_end_token_id=END, **fields
    )


def fake_model(config: LaReConfig, mode: FakeTensorMode) -> LaReForConditionalGeneration:
    with mode:
        model = LaReForConditionalGeneration(config)
    if model.reconstructor is not None:
        model.reconstructor.image_tokenizer.requires_grad_(False)  # KL-16 is frozen (Sec. 3.3)
    return model


def prompt_ids(config: LaReConfig, batch: int, with_answer: bool) -> dict[str, torch.Tensor]:
    """`text, 256 x <|image|>, question, [<|latent_start|> K*m slots <|latent_end|>], [answer]` for every row."""
    generator = torch.Generator().manual_seed(0)
    steps = config.num_latent_steps
    region = [START] + [SLOT] * (steps * config.latent_tokens_per_step) + [END] if steps else []
    question = torch.randint(10, 900, (QUESTION_TOKENS,), generator=generator).tolist()
    row = [11] * 8 + [IMAGE] * config.image_seq_length + question + region
    answer = torch.randint(10, 900, (ANSWER_TOKENS,), generator=generator).tolist() if with_answer else []
    input_ids = torch.tensor([row + answer] * batch)
    size = config.vision_config.image_size
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator).clamp(-2, 2),
    }
    if with_answer:
        labels = torch.full_like(input_ids, -100)
        labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]
        inputs["labels"] = labels
        if steps:
            inputs["rationale_input_ids"] = torch.randint(10, 900, (batch, RATIONALE_TOKENS), generator=generator)
            inputs["rationale_attention_mask"] = torch.ones_like(inputs["rationale_input_ids"])
    return inputs


class RealMaskIndexing(TorchDispatchMode):
    """`fake[real_bool_mask]` as `fake[real_bool_mask.nonzero()]`: the same rows, in the same order. A fake tensor
    cannot run `nonzero` (its output shape depends on the data); the real mask can."""

    INDEX_OPS = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.INDEX_OPS and any(self._real_mask(index) for index in args[1]):
            indices = []
            for index in args[1]:
                indices.extend(index.nonzero(as_tuple=True) if self._real_mask(index) else (index,))
            args = (args[0], indices, *args[2:])
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _real_mask(index) -> bool:
        return isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool


class ComponentTracker:
    """Which component an op belongs to: the innermost component module running (forward), else the component
    whose forward created the autograd node being run (backward), else `heads` (the losses outside modules)."""

    def __init__(self, model: LaReForConditionalGeneration):
        self.stack: list[str] = []
        self.backward_label: str | None = None
        self.phase = "prefill"  # "prefill" (the first model call of a step / generate) or "decoding"
        self.lm_calls = 0
        self.in_model = False
        inner = model.model
        modules = {
            "vision tower": inner.vision_tower,
            "projector": inner.multi_modal_projector,
            "Extractor": inner.extractor,
            "U-Net + KL-16": model.reconstructor,
            "heads": model.lm_head,
            "alignment head": model.alignment_head,
        }
        for label, module in modules.items():
            if module is not None:
                label = "heads" if label == "alignment head" else label
                module.register_forward_pre_hook(lambda *_, label=label: self.stack.append(label))
                module.register_forward_hook(self._pop)
        inner.register_forward_pre_hook(self._model_start)
        inner.register_forward_hook(self._model_end)
        inner.language_model.register_forward_pre_hook(self._lm_start)
        inner.language_model.register_forward_hook(self._pop)

    def _pop(self, *_) -> None:  # a forward hook returning a value would replace the module's output
        self.stack.pop()

    def _model_start(self, *_):
        self.in_model, self.lm_calls = True, 0

    def _model_end(self, *_):
        self.in_model, self.phase = False, "decoding"

    def _lm_start(self, *_):
        if not self.in_model:
            label = "LM for losses"
        elif self.phase == "decoding":
            label = "decoding"
        else:
            label = "LM prefill" if self.lm_calls == 0 else "latent phase"
        self.lm_calls += 1
        self.stack.append(label)

    def label(self) -> str:
        if self.stack:
            return self.stack[-1]
        return self.backward_label or "heads"

    def set_backward_label(self, label: str):
        def hook(*_):
            self.backward_label = label

        return hook


class ComponentFlops(TorchFunctionMode):
    """Tags every autograd node with the component that created it (so its backward is counted there)."""

    def __init__(self, tracker: ComponentTracker):
        super().__init__()
        self.tracker = tracker
        self.tagged: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            for tensor in tree_flatten(out)[0]:
                node = getattr(tensor, "grad_fn", None) if isinstance(tensor, torch.Tensor) else None
                if node is not None and node not in self.tagged:
                    self.tagged.add(node)
                    node.register_prehook(self.tracker.set_backward_label(self.tracker.label()))
        return out


class CountFlops(TorchDispatchMode):
    """FLOPs of every op (transformers' formulas of `torch.utils.flop_counter`) under the tracker's component."""

    def __init__(self, tracker: ComponentTracker, registry: dict):
        super().__init__()
        self.tracker, self.registry = tracker, registry
        self.flops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counter = self.registry.get(func._overloadpacket)
        if counter is not None:
            self.flops[self.tracker.label()] += counter(*args, **kwargs, out_val=out)
        return out


def cpu_attention_formulas() -> dict:
    """FlopCounterMode counts the CUDA SDPA kernels; the CPU flash kernel (what SDPA dispatches to for these CPU
    fake tensors) computes the same two matmuls (four in backward), so it gets the same formulas."""
    aten = torch.ops.aten
    pairs = {
        aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: aten._scaled_dot_product_flash_attention_backward,
    }
    formulas = {}
    for cpu_op, cuda_op in pairs.items():
        formula = flop_registry[cuda_op]  # already reads shapes from tensors
        formula = functools.partial(formula)
        formula._get_raw = True  # so FlopCounterMode does not wrap it a second time
        formulas[cpu_op] = formula
    return formulas


def measure(model, run) -> tuple[dict[str, int], int]:
    """Per-component FLOPs of `run()`, and FlopCounterMode's total for the same run."""
    tracker = ComponentTracker(model)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as total:
        counter = CountFlops(tracker, total.flop_registry)  # the same formulas, the CPU attention ones included
        with ComponentFlops(tracker), counter, RealMaskIndexing():
            run(tracker)
    return dict(counter.flops), total.get_total_flops()


def training_step(model, inputs):
    def run(tracker):
        model.train()
        outputs = model(**inputs, compute_latent_losses=model.config.num_latent_steps > 0)
        tracker.stack.clear()
        outputs.loss.backward()

    return run


def generation(model, inputs, new_tokens: int):
    """The forward calls `generate` makes: the prompt (the latent phase included), then one token at a time on
    the KV cache. (GenerationMixin itself reads the sampled tokens, which fake logits do not have.)"""

    @torch.no_grad()
    def run(tracker):
        model.eval()
        outputs = model(**inputs, use_cache=True, logits_to_keep=1)
        cache, attention_mask = outputs.past_key_values, inputs["attention_mask"]
        next_token = torch.full((attention_mask.shape[0], 1), 42)
        for _ in range(new_tokens):
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
            position_ids = attention_mask.sum(-1, keepdim=True) - 1
            outputs = model(
                input_ids=next_token, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            cache = outputs.past_key_values

    return run


def saved_activation_bytes(model, inputs, checkpointing: bool) -> int:
    """Bytes autograd saves for backward in one training forward (parameters excluded)."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters = {parameter.untyped_storage()._cdata for parameter in model.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()._cdata
        if storage not in parameters and storage not in seen:
            seen.add(storage)
            total += tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), RealMaskIndexing():
        model(**inputs, compute_latent_losses=model.config.num_latent_steps > 0)
    if checkpointing:
        model.gradient_checkpointing_disable()
    return total


def parameter_bytes(model) -> tuple[int, int]:
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def cost(preset: str, num_latent_steps: int, batch: int, new_tokens: int = NEW_TOKENS) -> dict:
    """Everything the table reports for one preset and K."""
    config = preset_config(preset, num_latent_steps)
    model = fake_model(config, FakeTensorMode(allow_non_fake_inputs=True))
    train_inputs = prompt_ids(config, batch, with_answer=True)
    train_flops, train_total = measure(model, training_step(model, train_inputs))
    generate_flops, generate_total = measure(model, generation(model, prompt_ids(config, batch, False), new_tokens))
    for flops, total in ((train_flops, train_total), (generate_flops, generate_total)):
        if sum(flops.values()) != total:
            raise RuntimeError(f"component FLOPs {sum(flops.values())} != FlopCounterMode total {total}")
    model.zero_grad(set_to_none=True)
    return {
        "train": train_flops,
        "generate": generate_flops,
        "parameters": parameter_bytes(model),
        "activations": saved_activation_bytes(model, train_inputs, False),
        "activations_checkpointed": saved_activation_bytes(model, train_inputs, True),
    }


def print_table(results: dict[tuple[str, int], dict], batch: int) -> None:
    print(f"batch={batch}, fp32; training step: {QUESTION_TOKENS}-token question, {ANSWER_TOKENS}-token answer, "
          f"{RATIONALE_TOKENS}-token rationale; generate: {NEW_TOKENS} new tokens. TFLOPs:")  # fmt: skip
    header = f"{'component':>14}" + "".join(f" {f'{p} K={k}':>18}" for p, k in results)
    for kind in ("train", "generate"):
        print(f"-- {kind} --")
        print(header)
        for component in COMPONENTS:
            print(
                f"{component:>14}" + "".join(f" {r[kind].get(component, 0) / 1e12:>18.3f}" for r in results.values())
            )
        print(f"{'total':>14}" + "".join(f" {sum(r[kind].values()) / 1e12:>18.3f}" for r in results.values()))
    print("-- memory (GB) --")
    print(header)
    rows = {
        "params train": lambda r: r["parameters"][0],
        "params frozen": lambda r: r["parameters"][1],
        "saved act.": lambda r: r["activations"],
        "saved act. GC": lambda r: r["activations_checkpointed"],
    }
    for name, value in rows.items():
        print(f"{name:>14}" + "".join(f" {value(r) / 1e9:>18.2f}" for r in results.values()))
    print("-- ratios --")
    for (preset, k), r in results.items():
        train, generate = sum(r["train"].values()), sum(r["generate"].values())
        line = f"{preset} K={k}: U-Net + KL-16 share of the training step {r['train'].get('U-Net + KL-16', 0) / train:.1%}"
        base = results.get((preset, 0))
        if k and base:
            line += (f", LaRe / K=0 FLOPs: training {train / sum(base['train'].values()):.2f}x, generation "
                     f"{generate / sum(base['generate'].values()):.3f}x")  # fmt: skip
        line += (
            f", saved activations with / without checkpointing {r['activations_checkpointed'] / r['activations']:.2f}x"
        )
        print(line)


def plot(results: dict[tuple[str, int], dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    labels = [f"{preset}\nK={k}" for preset, k in results]
    for axis, kind in zip(axes, ("train", "generate")):
        bottom = [0.0] * len(results)
        for component in COMPONENTS:
            values = [r[kind].get(component, 0) / 1e12 for r in results.values()]
            axis.bar(labels, values, bottom=bottom, label=component)
            bottom = [b + v for b, v in zip(bottom, values)]
        axis.set_title(f"{'training step' if kind == 'train' else 'generate (64 new tokens)'}")
        axis.set_ylabel("TFLOPs")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["lare-1.5b"])
    parser.add_argument("--batch", type=int, default=2, help="2 or more: L_sym needs in-batch negatives")
    parser.add_argument("--k", type=int, default=4, help="latent steps of the LaRe column (K=0 is always shown)")
    parser.add_argument("--plot", help="write the stacked-bar PNG here")
    parser.add_argument("--save", help="also write the figures as JSON (to combine runs with --load)")
    parser.add_argument("--load", nargs="+", help="print / plot the JSON files of earlier runs instead of measuring")
    args = parser.parse_args()
    if args.k < 1:
        raise ValueError(f"--k {args.k}: the LaRe column needs K >= 1 (K=0 is always measured beside it).")
    results = {}
    if args.load:
        for path in args.load:
            with open(path) as handle:
                results.update({(row["preset"], row["k"]): row["cost"] for row in json.load(handle)})
    else:
        for preset in args.preset:
            for k in (args.k, 0):
                results[(preset, k)] = cost(preset, k, args.batch)
    if args.save:
        with open(args.save, "w") as handle:
            json.dump([{"preset": p, "k": k, "cost": row} for (p, k), row in results.items()], handle)
    print_table(results, args.batch)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
