"""The ``fbnet`` command: data, train, evaluate, export, parity."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

import click

from .command import FbnetGroup
from .config import ConfigError, FBNetConfig

DEFAULT_SYNTH_SIZES = (800, 200, 200)


def fbnet_home() -> Path:
    return Path(os.environ.get("FBNET_HOME", Path.home() / ".cache" / "fbnet"))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.secho(f"warning: {message}", fg="yellow", err=True)


@click.group(cls=FbnetGroup)
@click.version_option(package_name="fbnet")
def main():
    """FB-Net image-text retrieval: train, evaluate, export, check parity."""
    warnings.showwarning = _show_warning


@main.group()
def data():
    """Make or convert datasets into the fbnet layout (docs/data.md)."""


@data.command("synth")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--sizes", default=",".join(map(str, DEFAULT_SYNTH_SIZES)), show_default=True,
              help="train,val,test image counts")
@click.option("--image-size", default=128, show_default=True)
def data_synth(out, seed, sizes, image_size):
    """Generate the embedded synthetic dataset (deterministic from --seed)."""
    from .data.synth import generate

    counts = tuple(int(s) for s in sizes.split(","))
    if len(counts) != 3:
        raise click.BadParameter("give three counts: train,val,test", param_hint="--sizes")
    generate(out, seed=seed, sizes=counts, image_size=image_size)
    click.echo(f"wrote {sum(counts)} images to {out}")


@data.command("convert")
@click.argument("kind", type=click.Choice(["pascal-sentence", "wikipedia", "nus-wide", "flickr",
                                           "karpathy", "coco"]))
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="image directory, where the format keeps images apart from its annotations")
@click.option("--seed", default=0, show_default=True, help="for formats without official splits")
def data_convert(kind, source, out, images, seed):
    """Convert a public dataset's files (SOURCE) into the fbnet layout."""
    from .data import convert

    ds = convert.CONVERTERS[kind](source, out, images=images, seed=seed)
    counts = {s: sum(1 for i in ds.items if i.split == s) for s in ("train", "val", "test")}
    click.echo(f"wrote {out}: {counts} (labels: {'yes' if ds.has_labels else 'no'})")


def default_dataset(seed: int = 0) -> Path:
    """The synthetic default, generated on first use under $FBNET_HOME (~/.cache/fbnet)."""
    from .data.synth import SYNTH_VERSION, generate

    root = fbnet_home() / "data" / f"synth-v{SYNTH_VERSION}-seed{seed}"
    root.parent.mkdir(parents=True, exist_ok=True)
    # a lock: torchrun's processes all ask for it at once, and one generates it
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "manifest.jsonl").is_file():
            click.echo(f"generating the embedded synthetic dataset in {root}")
            generate(root, seed=seed, sizes=DEFAULT_SYNTH_SIZES)
    return root


@main.command()
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              help="dataset in the fbnet layout (default: the embedded synthetic set)")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML/JSON config (default: the embedded preset for the synthetic set)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="run directory [default: runs/<dataset name>]")
@click.option("--resume", is_flag=True, help="continue the interrupted run in --out")
@click.option("--epochs", type=click.IntRange(min=1), help="override train.epochs")
@click.option("--word-vectors", type=click.Path(dir_okay=False), help="word2vec binary or GloVe text")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override one config value (YAML), e.g. --set loss.name=triplet; repeatable")
def train(data_dir, config, out, resume, epochs, word_vectors, overrides):
    """Train FB-Net; prints validation MAP per epoch and the test metrics at the end."""
    if resume:
        # a resumed run keeps its own config and dataset (only --epochs may change)
        if out is None:
            raise click.UsageError("--resume needs --out, the run directory to continue")
        if overrides:
            raise ConfigError(f"{out / 'last.pt'}: --set cannot change a resumed run, which keeps the config it "
                              "started with; start a new run (another --out) with other values")
        if word_vectors:
            raise ConfigError(f"{out / 'last.pt'}: --word-vectors cannot change a resumed run: its word embeddings "
                              "were initialised at the start and have been trained since; start a new run "
                              "(another --out) to use other vectors")
        from .checkpoint import load_checkpoint

        state = load_checkpoint(out / "last.pt")
        cfg = FBNetConfig.from_dict(state["config"], str(out / "last.pt"))
        data_dir = data_dir or Path(state["data_root"])
    elif config is None and data_dir is None:
        cfg = FBNetConfig.load(resources.files("fbnet") / "configs" / "synth.yaml")
    else:
        cfg = FBNetConfig.load(config) if config else FBNetConfig()
    cfg = cfg.with_overrides(overrides)
    if epochs is not None:
        cfg.train.epochs = epochs
    if word_vectors:
        cfg.data.word_vectors = word_vectors
    # torch is imported from here on: a bad config fails above, in a fraction of a second
    from .data.manifest import load_dataset
    from .evaluate import evaluate, format_report
    from .train import train as run_train

    root = data_dir or (Path(cfg.data.root) if cfg.data.root else default_dataset(cfg.train.seed))
    dataset = load_dataset(root)
    out = out or Path("runs") / dataset.name
    t0 = time.time()
    best, val_sims = run_train(cfg, dataset, out, resume=resume, echo=click.echo)
    if best is None:  # a torchrun process other than rank 0: rank 0 reports
        return
    split = dataset.report_split
    if split == "val":
        click.echo("the dataset has no test split: reporting the validation split")
    report = evaluate(best, split, data=str(root), sims=val_sims if split == "val" else None)
    click.echo(format_report(report))
    click.echo(f"checkpoint: {best}\nmetrics: {out / f'metrics-{split}.json'}  PR curve: {out / f'pr-{split}.png'}"
               f"\ntotal time {time.time() - t0:.0f}s")


@main.command("distill-detector")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="dataset whose train images teach the head and whose dev images select it")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="its model.detector is the teacher; its model.backbone.weights the MobileNetV2 weights")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="the detector file (.pt)")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override one config value")
def distill_detector_cmd(data_dir, config, out, epochs, overrides):
    """Distil the config's detector (the teacher) into a light head on MobileNetV2's own maps
    (model.detector.name: mobilenet_v2_head); the dev epoch with the best box F1 is kept."""
    cfg = FBNetConfig.load(config).with_overrides(overrides)
    from .data.manifest import load_dataset
    from .distill import distill_detector

    info = distill_detector(cfg, load_dataset(data_dir), out, epochs=epochs, echo=click.echo)
    best = info["best"]
    click.echo(f"wrote {out}: epoch {best['epoch']}, dev recall {best['recall']:.3f}, precision "
               f"{best['precision']:.3f} against the teacher\nserve it: fbnet export CHECKPOINT --out BUNDLE "
               f"--detector {out}\ntrain with it: --set model.detector.name=mobilenet_v2_head "
               f"--set model.detector.weights={out}")


@main.command("evaluate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--split", default="test", type=click.Choice(["train", "val", "test"]), show_default=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="dataset (default: the one trained on)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="where to write JSON + PNG")
def evaluate_cmd(checkpoint, split, data_dir, out):
    """MAP (eq. 22), Recall@1/5/10 and R@sum (eq. 23) both ways, and the PR curves."""
    from .evaluate import evaluate, format_report

    report = evaluate(checkpoint, split, data=data_dir, out=out)
    click.echo(format_report(report))


@main.command("ensemble")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="ensemble file to write (.yaml or .json)")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="dataset (default: the first member's)")
@click.option("--grid", default="0.25,0.5,1,2", show_default=True, help="weights tried for each member after the first")
def ensemble_cmd(checkpoints, out, data_dir, grid):
    """Combine checkpoints into an ensemble, with score weights chosen on the validation split."""
    from .ensemble import Ensemble, Member, choose_weights, member_checkpoints, write_ensemble
    from .evaluate import format_report, member_scores

    draft = Ensemble(out, tuple(Member(Path(c), 1.0) for c in checkpoints))
    data_dir = data_dir or member_checkpoints(draft)[0]["data_root"]
    parts = [member_scores(c, "val", data_dir) for c in checkpoints]
    caps = parts[0][2]
    weights, report = choose_weights([p[0] for p in parts], caps.image, caps.image_labels, caps.labels,
                                     tuple(float(g) for g in grid.split(",")))
    write_ensemble(out, list(checkpoints), weights)
    click.echo(f"member weights (val): {', '.join(f'{c}: {w}' for c, w in zip(checkpoints, weights))}")
    click.echo(format_report({**report, "split": "val"}))
    click.echo(f"wrote {out}")


@main.command("info")
@click.argument("path", type=click.Path(path_type=Path))
def info_cmd(path):
    """What a checkpoint, ensemble file, bundle or gallery holds: model, shapes, metrics, fusion
    weights, store, item counts and whether its files still match their sha256."""
    from .info import describe

    click.echo("\n".join(describe(path)))


@main.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="bundle directory")
@click.option("--fp16", is_flag=True, help="also build FP16 TensorRT engines (needs tensorrt and a GPU)")
@click.option("--opset", default=17, show_default=True, help="ONNX opset")
@click.option("--engines-only", is_flag=True, help="SOURCE is a bundle: build its TensorRT engines")
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False, path_type=Path),
              help="also write a Triton model repository here (SOURCE may be a bundle)")
@click.option("--gallery", type=click.Path(file_okay=False, path_type=Path),
              help="with --triton: add the two-stage search models over this gallery")
@click.option("--triton-max-batch", default=16, show_default=True, help="with --triton: max_batch_size")
@click.option("--int8", is_flag=True, help="quantize graphs to INT8 for CPU serving (--int8-graphs)")
@click.option("--int8-graphs", default="detector", show_default=True,
              help="with --int8: comma-separated graphs to quantize (detector, image_encoder); the INT8 "
                   "image encoder costs accuracy (see BENCHMARKS.md)")
@click.option("--calibration-images", default=64, show_default=True,
              help="with --int8: training images to calibrate on")
@click.option("--calibration-method", default="minmax", show_default=True,
              type=click.Choice(["minmax", "percentile", "entropy"]), help="with --int8: activation ranges")
@click.option("--detector-size", type=int, help="run YOLOv3-tiny at this input size (a multiple of 32) instead of the "
              "checkpoint's: a faster image query, with boxes the weights were not trained on (BENCHMARKS.md, "
              "'Image query: detector input size')")
@click.option("--detector", "detector_file", type=click.Path(dir_okay=False, path_type=Path),
              help="serve this distilled detector (fbnet distill-detector) instead of the checkpoint's: boxes "
                   "from MobileNetV2's own maps, which the weights were not trained on (BENCHMARKS.md)")
def export_cmd(source, out, fp16, opset, engines_only, triton_repo, gallery, triton_max_batch, int8,
               int8_graphs, calibration_images, calibration_method, detector_size, detector_file):
    """Split a checkpoint (SOURCE) into ONNX graphs (+ TensorRT engines) in a bundle directory; an
    ensemble file (.yaml/.json, `fbnet ensemble`) into an ensemble bundle of every member's."""
    from fbnet.ensemble import is_ensemble
    from fbnet.export.bundle import build_bundle_engines, export_bundle
    from fbnet.export.ensemble import export_ensemble_bundle, member_dirs, record_members
    from fbnet.export.quantize import quantize_bundle
    from fbnet.export.triton import write_triton_repository
    from fbnet.runtime.engine.ensemble import is_ensemble_bundle

    if (source / "manifest.json").is_file() or is_ensemble_bundle(source):  # already a bundle
        if triton_repo is None and not int8 and not engines_only:
            raise click.UsageError("SOURCE is a bundle: give --triton REPO, --int8 or --engines-only")
        if detector_size is not None or detector_file is not None:
            raise click.UsageError("--detector-size and --detector take a checkpoint; SOURCE is a bundle")
        out = source
    elif engines_only:
        raise click.UsageError("--engines-only takes a bundle directory (SOURCE)")
    elif out is None:
        raise click.UsageError("give --out BUNDLE")
    elif (detector_size is not None or detector_file is not None) and is_ensemble(source):
        raise click.UsageError("--detector-size and --detector take a checkpoint, not an ensemble file")
    elif detector_size is not None and detector_file is not None:
        raise click.UsageError("give --detector-size (YOLOv3-tiny's input) or --detector (a distilled one), not both")
    elif is_ensemble(source):
        export_ensemble_bundle(source, out, fp16=fp16, opset=opset, log=click.echo)
        click.echo(f"wrote ensemble bundle {out}")
    else:
        export_bundle(source, out, fp16=fp16, opset=opset, log=click.echo, detector_size=detector_size,
                      detector_file=detector_file)
        click.echo(f"wrote bundle {out}")
    ensemble = is_ensemble_bundle(out)
    models = member_dirs(out) if ensemble else [out]
    if engines_only:
        for model in models:
            engines = build_bundle_engines(model, fp16=True, log=click.echo)
            click.echo(f"built {len(engines)} engines in {model}")
    if int8:
        from fbnet.checkpoint import load_checkpoint
        from fbnet.data.manifest import load_dataset
        from fbnet.runtime.engine.manifest import BundleError, Manifest

        for model in models:
            source_checkpoint = Manifest.load(model / Manifest.FILE).source_checkpoint or {}
            if "path" not in source_checkpoint:
                raise BundleError(f"{model / Manifest.FILE}: records no source checkpoint to calibrate INT8 on")
            ckpt = load_checkpoint(source_checkpoint["path"])
            train = load_dataset(ckpt["data_root"]).split("train")[:calibration_images]
            click.echo(f"quantizing {model} to INT8, calibrated on {len(train)} training images")
            graphs = tuple(g.strip() for g in int8_graphs.split(",") if g.strip())
            quantize_bundle(model, [it.image for it in train], graphs, calibration_method, log=click.echo)
    if ensemble and (engines_only or int8):
        record_members(out)  # the members' manifests changed
    if triton_repo is not None:
        write_triton_repository(out, triton_repo, gallery, max_batch=triton_max_batch)
        click.echo(f"wrote Triton model repository {triton_repo}" +
                   ("" if gallery else " (graphs only; --gallery G adds the search models)"))


@main.command("parity")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--split", default="test", type=click.Choice(["train", "val", "test"]), show_default=True)
@click.option("--backend", default="auto", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), show_default=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="dataset (default: the one trained on)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="also write the result here")
def parity_cmd(checkpoint, bundle, split, backend, data_dir, json_out):
    """Check that the runtime ranks a split as PyTorch does (exit 1 when MAP differs too much).
    CHECKPOINT may be an ensemble file, with its ensemble bundle."""
    from .atomic import atomic_write_text
    from .parity import format_parity, run_parity

    res = run_parity(checkpoint, bundle, split=split, backend=backend, data=data_dir)
    click.echo(format_parity(res))
    if json_out:
        atomic_write_text(json_out, json.dumps(res, indent=1))
    if not res["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
