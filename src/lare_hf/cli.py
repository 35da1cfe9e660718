"""The `lare` command: build, generate, demo (and the training / evaluation / data commands)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from .destinations import refuse_non_empty
from .output_lock import OutputLock

# Errors that come from what the user gave (arguments, files, data): one line `error: ...`, exit code 2.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _parse_override(items: list[str] | None) -> dict:
    """`key=value` pairs (values parsed as JSON when possible) for LaReConfig fields."""
    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value (e.g. --set window_size=4), got {item!r}.")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def cmd_build(args: argparse.Namespace) -> int:
    from .modeling.configuration_lare import LaReConfig

    overrides = _parse_override(args.set)
    LaReConfig.check_field_names(overrides, "--set key")
    if args.no_reconstructor:
        if overrides.get("use_reconstructor") is True:
            raise ValueError("--no-reconstructor contradicts --set use_reconstructor=true; pass one of them.")
        if args.image_tokenizer:
            raise ValueError("--image-tokenizer is the reconstructor's; it cannot go with --no-reconstructor.")
        overrides["use_reconstructor"] = False
        overrides.setdefault("image_loss_weight", 0.0)  # no U-Net, so no L_img (Eq. 7) if it is trained later
    refuse_non_empty(args.output, "lare build --output", args.overwrite)
    with OutputLock(args.output):
        return _build(args, overrides)


def _build(args: argparse.Namespace, overrides: dict) -> int:
    from .build import build_checkpoint_parts, save_checkpoint
    from .modeling.image_tokenizer_check import warn_if_random_image_tokenizer

    model, processor = build_checkpoint_parts(
        args.preset,
        args.vision,
        args.text,
        args.image_tokenizer,
        overrides,
        seed=args.seed,
        from_llava=args.from_llava,
    )
    output = save_checkpoint(model, processor, args.output)
    warn_if_random_image_tokenizer(model.config, "lare build")
    num_params = sum(p.numel() for p in model.parameters())
    print(f"Wrote {model.config.model_type} checkpoint ({num_params / 1e6:.2f}M parameters) to {output}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .processing.processing_lare import to_rgb

    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path} does not exist; pass the path of a PNG or JPEG file.")
    try:
        with Image.open(path) as opened:
            image = to_rgb(opened)  # 16-bit / palette images scaled and composited, not clipped
    except OSError as error:
        raise ValueError(f"--image {path} is not a readable image ({error}).") from None
    from .evaluation.runner import generate_answer

    answer = generate_answer(args.model, image, args.prompt, args.num_latent_steps, args.max_new_tokens)
    print(answer)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.runner import evaluate

    report = evaluate(
        args.model,
        args.benchmark,
        args.data,
        num_latent_steps=args.num_latent_steps,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        split=args.split,
        image_folder=args.image_folder,
        limit=args.limit,
        output_dir=args.output_dir,
        device=args.device,
    )
    print(json.dumps(report, indent=2))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    refuse_non_empty(args.output, "lare data synth --output", args.overwrite)
    if args.benchmark == "refocus_chains":
        from .data.refocus_chains import write_refocus_chains

        paths = write_refocus_chains(
            args.output, args.num_train, args.num_test, seed=args.seed, hops=args.hops, layout=args.layout,
            num_captions=args.num_captions,
            **({} if args.caption_lookup_fraction is None else {"caption_lookup_fraction": args.caption_lookup_fraction}),
        )  # fmt: skip
    else:
        from .data.refocus_shapes import write_refocus_shapes

        paths = write_refocus_shapes(
            args.output, args.num_train, args.num_test, seed=args.seed, image_size=args.image_size
        )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def cmd_data_decontaminate(args: argparse.Namespace) -> int:
    from .data.decontamination import decontaminate, summary

    report = decontaminate(
        args.train, args.against, args.output, vision=args.vision, threshold=args.threshold, rules=args.rules,
        image_folder=args.image_folder, batch_size=args.batch_size, device=args.device, on_error=args.on_error,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(summary(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, quick=args.quick, overwrite=args.overwrite, lare_variant=args.variant)
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .configs import resolve_recipe_set
    from .training.arguments import parse_train_arguments
    from .training.run import run_all, run_stage

    if args.all:
        recipe_dir = resolve_recipe_set(args.recipes)
        files = [str(recipe_dir / f"stage{stage}.yaml") for stage in (1, 2, 3, 4)]
        missing = [file for file in files if not Path(file).is_file()]
        if missing:
            raise FileNotFoundError(
                f"lare train --all needs stage1.yaml ... stage4.yaml in --recipes {recipe_dir}; missing {missing}."
            )
        for record in run_all(files, model_name_or_path=args.model, overrides=overrides):
            print(json.dumps(record))
        return 0
    if args.config is None and not overrides:
        raise ValueError("lare train needs --config FILE (a stage recipe) and/or --key value arguments.")
    extra = list(overrides)
    if args.stage is not None:
        extra += ["--stage", str(args.stage)]
    if args.model is not None:
        extra += ["--model_name_or_path", args.model]
    model_args, data_args, training_args = parse_train_arguments(args.config, extra)
    print(json.dumps(run_stage(model_args, data_args, training_args)))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .training.run import merge_lora

    print(f"Merged LoRA adapters into {merge_lora(args.adapter, args.output, overwrite=args.overwrite)}")
    return 0


def cmd_export_lm(args: argparse.Namespace) -> int:
    from .serving import export_language_model

    output = export_language_model(
        args.model, args.output, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code
    )
    print(f"Wrote the bare language model (a plain causal-LM checkpoint) to {output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .openai_server import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        served_model_name=args.served_model_name,
        log_level=args.log_level,
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import files_to_upload, push_to_hub, write_model_card

    if args.dry_run:
        card = write_model_card(args.folder, args.repo_id)
        if card is None:
            print(f"Kept your own {args.folder}/README.md (not generated by lare_hf); a push would upload:")
        else:
            print(f"Wrote {card}; a push would upload:")
        for name in files_to_upload(args.folder):
            print(f"  {name}")
        return 0
    print(push_to_hub(args.folder, args.repo_id, private=args.private))
    return 0


def _parse_thresholds(items: list[str] | None) -> dict[str, list[float]] | None:
    """`criterion=t1,t2` items (`--thresholds cosine=0.9,0.95 l2=0.01`) -> {criterion: [t1, t2]}."""
    if not items:
        return None
    thresholds: dict[str, list[float]] = {}
    for item in items:
        criterion, _, values = item.partition("=")
        try:
            thresholds[criterion.strip()] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"--thresholds expects criterion=t1,t2 (e.g. cosine=0.9,0.95 l2=0.01), got {item!r}."
            ) from None
        if not values.strip():
            raise ValueError(f"--thresholds {item!r} gives no threshold; write e.g. {criterion or 'cosine'}=0.9.")
    return thresholds


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import attention, figures, halting, probing, steps
    from .analysis.common import AnalysisSource, write_report

    output = refuse_non_empty(args.output, f"lare analyze {args.analysis} --output", args.overwrite)
    output.mkdir(parents=True, exist_ok=True)
    kind = args.analysis
    if kind == "probing":
        report = probing.run(
            args.model, args.data, output, args.baseline, args.hops, args.limit, args.image_folder, args.device,
            args.num_latent_steps, args.num_pairs, args.seed, args.batch_size,
        )  # fmt: skip
    else:
        source = AnalysisSource(
            args.model, args.data, args.benchmark, args.limit, args.split, args.image_folder, args.device
        )
        if kind == "steps":
            report = steps.run(source, output, args.steps, args.batch_size, args.max_new_tokens)
        elif kind == "halting":
            thresholds = _parse_thresholds(args.thresholds)
            report = halting.run(
                source, output, args.num_latent_steps, thresholds, args.batch_size, args.max_new_tokens,
                args.max_latent_steps,
            )  # fmt: skip
        elif kind == "attention":
            report = attention.run(
                source, output, args.baseline, args.num_latent_steps, args.baseline_num_latent_steps, args.batch_size
            )
        else:
            report = figures.run(
                source, output, args.num_samples, args.num_latent_steps, args.num_inference_steps, args.seed,
                args.batch_size, args.sweep, args.reconstructor,
            )  # fmt: skip
    path = write_report(report, output / f"{kind}.json")
    print(f"Wrote {path}")
    return 0


def _add_model_commands(sub) -> None:
    """`lare build`, `generate`, `train`, `merge` and `push`."""
    build = sub.add_parser("build", help="write a LaRe checkpoint from a preset or from pretrained parts")
    build.add_argument("--preset", default=None, help="lare-tiny, lare-0.5b, lare-1.5b, lare-7b or a YAML path")
    build.add_argument("--vision", default=None, help="vision encoder folder or Hub id (CLIP/SigLIP)")
    build.add_argument(
        "--text", default=None, help="causal LM folder or Hub id (with its tokenizer), or a GGUF file / folder"
    )
    build.add_argument(
        "--from-llava", default=None, help="convert a LlavaForConditionalGeneration checkpoint (folder or Hub id)"
    )
    build.add_argument("--image-tokenizer", default=None, help="KL-16 AutoencoderKL folder or Hub id")
    build.add_argument("--output", required=True, help="folder to write")
    build.add_argument("--seed", type=int, default=None, help="init seed (tiny preset)")
    build.add_argument("--set", nargs="*", help="LaReConfig overrides, key=value (JSON values)")
    build.add_argument(
        "--no-reconstructor",
        action="store_true",
        help="inference checkpoint: no U-Net / image tokenizer (use_reconstructor=false); loads without diffusers",
    )
    build.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    build.set_defaults(func=cmd_build)

    generate = sub.add_parser("generate", help="answer a question about an image")
    generate.add_argument("--model", required=True)
    generate.add_argument("--image", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--num-latent-steps", type=int, default=None)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.set_defaults(func=cmd_generate)

    train = sub.add_parser(
        "train",
        help="run a training stage (recipe YAML + --key value overrides of the HfArgumentParser arguments)",
    )
    train.add_argument("--stage", type=int, choices=(1, 2, 3, 4), default=None)
    train.add_argument(
        "--config",
        default=None,
        help="stage recipe: a YAML path or a packaged recipe by name (stage2 = the paper's, tiny/stage2 = small-scale)",
    )
    train.add_argument("--all", action="store_true", help="chain stages 1-4 (recipes from --recipes)")
    train.add_argument(
        "--recipes",
        default="paper",
        help="folder with stage1.yaml ... stage4.yaml, or a packaged set by name: paper (default), tiny",
    )
    train.add_argument("--model", default=None, help="start checkpoint (overrides the recipe)")
    train.set_defaults(func=cmd_train, takes_overrides=True)

    merge = sub.add_parser("merge", help="merge LoRA adapters into a full checkpoint")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    merge.set_defaults(func=cmd_merge)

    export_lm = sub.add_parser(
        "export-lm",
        help="write the bare language model as a plain causal-LM checkpoint (split serving: vLLM decodes from the "
        "embeddings lare_hf.serving builds)",
    )
    export_lm.add_argument("--model", required=True, help="a LaRe checkpoint folder")
    export_lm.add_argument("--output", required=True)
    export_lm.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    export_lm.add_argument("--trust-remote-code", action="store_true", help="load the checkpoint's own code")
    export_lm.set_defaults(func=cmd_export_lm)

    serve = sub.add_parser(
        "serve",
        help="serve a checkpoint behind an OpenAI-compatible API (transformers serve, made to load LaRe)",
    )
    serve.add_argument("model", help="a LaRe checkpoint folder (or Hub id); requests name it as their `model`")
    serve.add_argument("--host", default="localhost", help="listen address (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ...")
    serve.add_argument("--dtype", default="auto", help="'auto' (the checkpoint's), 'bfloat16', 'float32', ...")
    serve.add_argument("--trust-remote-code", action="store_true", help="load the checkpoint's own code")
    serve.add_argument(
        "--served-model-name", default=None, help="a name requests may give as `model` (and /v1/models lists)"
    )
    serve.add_argument("--log-level", default="info", help="uvicorn's log level")
    serve.set_defaults(func=cmd_serve)

    push = sub.add_parser("push", help="upload a checkpoint with a generated model card to the Hub")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--dry-run", action="store_true", help="write the card and list the files, upload nothing")
    push.set_defaults(func=cmd_push)


def _add_eval_command(sub) -> None:
    """`lare eval`."""
    evaluation = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark file (JSON report + predictions)")
    evaluation.add_argument("--model", required=True)
    evaluation.add_argument(
        "--benchmark", required=True, help="mmbench, mmstar, mmvp, scienceqa, pope, refocus_chains or refocus_shapes"
    )
    evaluation.add_argument(
        "--data", required=True, help="parquet / JSON / JSONL file, folder, or save_to_disk folder"
    )
    evaluation.add_argument("--num-latent-steps", type=int, default=None, help="K (default: the processor's)")
    evaluation.add_argument("--batch-size", type=int, default=8)
    evaluation.add_argument("--max-new-tokens", type=int, default=None)
    evaluation.add_argument("--split", default=None)
    evaluation.add_argument("--image-folder", default=None)
    evaluation.add_argument("--limit", type=int, default=None)
    evaluation.add_argument("--output-dir", default=None, help="where the report goes (default: the checkpoint)")
    evaluation.add_argument("--device", default=None)
    evaluation.set_defaults(func=cmd_eval)


def _add_data_commands(sub) -> None:
    """`lare data synth`."""
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate a synthetic benchmark (JSONL + PNG)")
    synth.add_argument("--output", required=True)
    synth.add_argument(
        "--benchmark", choices=("refocus_chains", "refocus_shapes"), default="refocus_chains",
        help="refocus_chains (docs/refocus_chains.md) or refocus_shapes (docs/refocus_shapes.md)",
    )  # fmt: skip
    synth.add_argument("--hops", type=int, nargs="+", default=[1, 2, 3, 4], help="refocus_chains chain lengths")
    synth.add_argument("--layout", choices=("fixed", "random"), default="fixed", help="refocus_chains cell layout")
    synth.add_argument("--num-captions", type=int, default=0, help="refocus_chains alignment captions to write")
    synth.add_argument("--caption-lookup-fraction", type=float, default=None,
                       help="refocus_chains: share of one-cell lookup captions ('What is the mark of the pink cell?'); "
                       "default: write_refocus_chains' CAPTION_LOOKUP_FRACTION")  # fmt: skip
    synth.add_argument("--num-train", type=int, default=2000)
    synth.add_argument("--num-test", type=int, default=500)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64, help="refocus_shapes image size")
    synth.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    synth.set_defaults(func=cmd_data_synth)
    clean = data_sub.add_parser(
        "decontaminate",
        help="remove training samples that match benchmark data (Appendix B): exact question-answer pairs and "
        "near-duplicate images (docs/decontamination.md)",
    )
    clean.add_argument("--train", required=True, help="training records (JSON / JSONL / parquet / save_to_disk)")
    clean.add_argument("--against", nargs="+", required=True,
                       help="records files, or BENCHMARK=PATH for a benchmark file (e.g. mmbench=mmbench_dev.tsv)")  # fmt: skip
    clean.add_argument("--output", required=True, help="the cleaned file (.jsonl, .json or .parquet)")
    clean.add_argument("--vision", default=None, help="local vision model folder (CLIP / SigLIP / LaRe checkpoint)")
    clean.add_argument("--threshold", type=float, default=None, help="cosine similarity above which images match")
    clean.add_argument("--rules", nargs="+", choices=("text", "image"), default=["text", "image"])
    clean.add_argument("--image-folder", default=None, help="root of --train's relative image paths")
    clean.add_argument("--batch-size", type=int, default=32)
    clean.add_argument("--device", default=None)
    clean.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="malformed --train records")
    clean.add_argument("--overwrite", action="store_true", help="replace an existing --output and its report")
    clean.set_defaults(func=cmd_data_decontaminate)


def _add_analyze_commands(sub) -> None:
    """`lare analyze steps|halting|probing|attention|figures`."""
    analyze = sub.add_parser("analyze", help="the paper's analyses (JSON report + PNG figures in --output)")
    analyze_sub = analyze.add_subparsers(dest="analysis", required=True)
    helps = {
        "steps": "latent steps sweep (Fig. 5): accuracy and generated tokens for each K",
        "halting": "adaptive halting (Table 4): the fixed-K row, then average steps (up to max_latent_steps), "
        "accuracy and tokens per criterion and threshold",
        "probing": "probing (Table 6): SVM / MLP accuracy of latent-vision and latent-text pairs",
        "attention": "attention of the first generated token to the image (Table 5): LaRe vs the K=0 model",
        "figures": "Fig. 3 refocus grid, Fig. 4 reconstructions, RefocusChains window-hit rate per step",
    }
    for name, text in helps.items():
        command = analyze_sub.add_parser(name, help=text)
        command.add_argument("--model", required=True, help="the LaRe checkpoint folder")
        command.add_argument(
            "--data", required=True, help="benchmark file (probing: reasoning records with rationales)"
        )
        command.add_argument("--output", required=True, help="folder for the JSON report and the PNG figures")
        command.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
        command.add_argument("--benchmark", default="refocus_chains", help="benchmark of --data (see lare eval)")
        command.add_argument("--num-latent-steps", type=int, default=None, help="K (default: the processor's)")
        command.add_argument("--batch-size", type=int, default=16)
        command.add_argument("--limit", type=int, default=None, help="use the first N samples")
        command.add_argument("--split", default=None)
        command.add_argument("--image-folder", default=None)
        command.add_argument("--device", default=None)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--max-new-tokens", type=int, default=None)
        if name == "steps":
            command.add_argument("--steps", type=int, nargs="+", default=None, help="the Ks (default 0..max)")
        if name == "halting":
            command.add_argument(
                "--thresholds", nargs="+", default=None,
                help="criterion=t1,t2 ... (cosine, l1, l2); default: quartiles of the model's own step distances",
            )  # fmt: skip
            command.add_argument(
                "--max-latent-steps", type=int, default=None,
                help="the adaptive rows' cap on latent steps (default: the model's max_latent_steps); the fixed row "
                "runs --num-latent-steps",
            )  # fmt: skip
        if name in ("probing", "attention"):
            command.add_argument(
                "--baseline", required=name == "attention", default=None,
                help="the model to compare with: the K=0 model (attention), the model w/o Extractor (probing)",
            )  # fmt: skip
        if name == "attention":
            command.add_argument("--baseline-num-latent-steps", type=int, default=0)
        if name == "probing":
            command.add_argument("--num-pairs", type=int, default=1000)
            command.add_argument("--hops", type=int, nargs="+", default=[1, 2, 3, 4],
                                 help="RefocusChains: the chain lengths each board is asked with")  # fmt: skip
        if name == "figures":
            command.add_argument("--num-samples", type=int, default=4, help="samples in Fig. 3 / Fig. 4")
            command.add_argument(
                "--num-inference-steps", type=int, default=50, help="reverse diffusion steps (Fig. 4)"
            )
            command.add_argument("--sweep", default=None, help="a steps.json of `lare analyze steps` to plot again")
            command.add_argument("--reconstructor", default=None,
                                 help="Fig. 4's decoder: a `lare analyze finetune-reconstructor` --output (default: "
                                 "the checkpoint's reconstructor)")  # fmt: skip
        command.set_defaults(func=cmd_analyze)
    _add_finetune_reconstructor_command(analyze_sub)


def cmd_finetune_reconstructor(args: argparse.Namespace) -> int:
    from .analysis.reconstructor import run, summary

    report = run(
        args.model, args.images, args.output, epochs=args.epochs, overwrite=args.overwrite, prompt=args.prompt,
        split=args.split, limit=args.limit, device=args.device, batch_size=args.batch_size,
        learning_rate=args.learning_rate, target=args.target, num_latent_steps=args.num_latent_steps, seed=args.seed,
        eval_images=args.eval_images,
    )  # fmt: skip
    print(summary(report, args.output))
    return 0


def _add_finetune_reconstructor_command(analyze_sub) -> None:
    """`lare analyze finetune-reconstructor` (§4.4: the U-Net behind Fig. 4, fine-tuned on ImageNet-1K)."""
    from .analysis.reconstructor import DEFAULT_PROMPT, TARGETS

    command = analyze_sub.add_parser(
        "finetune-reconstructor",
        help="fine-tune the reconstructor on an image set from the frozen model's latents (Fig. 4's decoder, §4.4)",
    )
    command.add_argument("--model", required=True, help="the LaRe checkpoint folder (frozen)")
    command.add_argument("--images", required=True,
                         help="folder of image files, or a datasets image set (save_to_disk folder, parquet ...)")  # fmt: skip
    command.add_argument("--output", required=True, help="folder for the fine-tuned reconstructor")
    command.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    command.add_argument("--epochs", type=int, default=5, help="passes over --images (the paper: 5 on ImageNet-1K)")
    command.add_argument("--batch-size", type=int, default=16)
    command.add_argument("--learning-rate", type=float, default=1e-4)
    command.add_argument("--target", choices=TARGETS, default="image",
                         help="what each step's latents reconstruct: the whole image (the paper's 'clear scenes') "
                         "or the crop under the step's window (L_img's target)")  # fmt: skip
    command.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question asked with each image")
    command.add_argument("--num-latent-steps", type=int, default=None, help="K (default: the processor's)")
    command.add_argument("--eval-images", type=int, default=32, help="images of the seeded before/after loss")
    command.add_argument("--split", default=None, help="the split of a datasets image set")
    command.add_argument("--limit", type=int, default=None, help="use the first N images")
    command.add_argument("--device", default=None)
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(func=cmd_finetune_reconstructor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lare", description="LaRe (Latent Refocusing) for Hugging Face")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_model_commands(sub)
    _add_eval_command(sub)
    _add_data_commands(sub)
    _add_analyze_commands(sub)

    from .demo import DEMO_VARIANT, QUICK_HELP, VARIANT_HELP

    demo_help = (
        "the whole pipeline offline on CPU: the reproduction's small LaRe for RefocusChains (1-2 hops), trained "
        "against the K=0 baseline"
    )
    demo = sub.add_parser("demo", help=demo_help, description=demo_help)
    demo.add_argument("--output", default="lare-demo")
    demo.add_argument("--quick", action="store_true", help=QUICK_HELP)
    demo.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    demo.add_argument(
        "--variant",
        default=DEMO_VARIANT,
        help=VARIANT_HELP,
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "build" and not (args.preset or args.vision or args.from_llava):
        parser.error("lare build needs --preset, --vision/--text or --from-llava")
    try:
        if getattr(args, "takes_overrides", False):
            return args.func(args, unknown)
        return args.func(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
