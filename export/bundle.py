"""``fbnet export``: split a checkpoint into a bundle directory of graphs plus a manifest.

::

    BUNDLE/
      detector.onnx  image_encoder.onnx  text_encoder.onnx  scorer.onnx  reranker.onnx
      vocab.json     manifest.json       [*.engine, timing.cache with --fp16 on a GPU host]

``manifest.json`` records the format version, each graph's inputs and outputs (shapes, dtypes,
dynamic axes), precision, preprocessing constants, fusion weights, the checkpoint's validation
metrics, the export check (largest differences to PyTorch), library versions and the sha256 of
every file. The bundle is built in a temporary directory and renamed into place.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fbnet.atomic import atomic_dir
from fbnet.checkpoint import as_exported, library_versions, load_checkpoint
from fbnet.data.manifest import DatasetError, load_dataset
from fbnet.evaluate import load_model
from fbnet.models.detector import detect
from fbnet.pipeline import frozen_from_checkpoint
from fbnet.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image
from fbnet.runtime.engine.bundle import sha256
from fbnet.runtime.engine.manifest import Engines, GraphSpec, Manifest, ModelSpec, Preprocess, TensorSpec
from fbnet.windows import image_block_boxes

from .graphs import DetectorGraph, ImageEncoderGraph, ScorerGraph, TextEncoderGraph, graph_io, key_name, shared_stage
from .onnx_export import DEFAULT_OPSET, ExportError, compare, export_graph, input_specs, output_specs
from .ort_optimize import save_optimized
from .tensorrt import build_engines, tensorrt_status

FLOAT32_TOLERANCE = 1e-4


def sample_inputs(ckpt: dict, cfg, detector, n: int = 3):
    """Real canvases and captions from the checkpoint's dataset (its test split, or validation when
    it has none, as Flickr8k here), else synthetic ones."""
    size = cfg.model.backbone.image_size
    try:
        dataset = load_dataset(ckpt["data_root"])
        split = dataset.report_split
        items = dataset.split(split)[:n]
        canvases = np.stack([load_image(it.image, size) for it in items])
        captions = [it.captions[0] for it in items] + [items[0].captions[-1]]
        source = f"{len(items)} {split} images of {ckpt['data_root']}"
    except (DatasetError, OSError, KeyError):
        rng = np.random.default_rng(0)
        canvases = rng.random((n, 3, size, size), dtype=np.float32)
        captions = ["a small red circle on grass", "a dog runs", "two people walk on the beach"]
        source = "random canvases (the checkpoint's dataset is not available here)"
    images = torch.from_numpy(canvases)
    boxes, scores = detect(detector, images)
    per_image = [image_block_boxes(size, b.numpy(), s.numpy(), cfg.model.levels, cfg.model.detector.max_boxes)
                 for b, s in zip(boxes, scores)]
    block_boxes = torch.from_numpy(np.stack([p[0] for p in per_image]))
    fg_mask = torch.from_numpy(np.stack([p[1] for p in per_image]).astype(np.float32))
    return images, block_boxes, fg_mask, captions, source


def export_checked(root: Path, name: str, module: torch.nn.Module, args: tuple, io: dict, opset: int,
                   log=print) -> tuple[dict, GraphSpec]:
    """Export ``module`` on ``args`` as ``root/<name>.onnx`` with ``io``'s names and dynamic axes,
    check it against PyTorch (relative difference at most :data:`FLOAT32_TOLERANCE`, else
    :class:`ExportError`) and save ONNX Runtime's optimised form: ``(the check, its GraphSpec)``."""
    path = root / f"{name}.onnx"
    export_graph(module, args, path, io["inputs"], io["outputs"], io["dynamic"], opset)
    check = compare(path, module, args, io["inputs"])
    log(f"  {path.name:20s} max |diff| {check.max_abs:.2e}  relative {check.max_rel:.2e}")
    if check.max_rel > FLOAT32_TOLERANCE:
        raise ExportError(f"{path.name}: ONNX Runtime differs from PyTorch by {check.max_rel:.2e} "
                          f"(relative), above the float32 tolerance {FLOAT32_TOLERANCE}")
    spec = GraphSpec(path.name, [TensorSpec.from_dict(t) for t in input_specs(path)],
                     [TensorSpec.from_dict(t) for t in output_specs(path)],
                     {k: {str(a): n for a, n in v.items()} for k, v in io["dynamic"].items()},
                     save_optimized(root, name, path.name))
    return check.to_json(), spec


def export_bundle(ckpt_path: str | Path, out: str | Path, fp16: bool = False, opset: int = DEFAULT_OPSET,
                  log=print, detector_size: int | None = None, detector_file: str | Path | None = None) -> Path:
    """``detector_size``: run YOLOv3-tiny at that input size instead of the checkpoint's
    (:func:`~fbnet.checkpoint.with_detector_size`); ``detector_file``: serve that distilled
    detector instead (:func:`~fbnet.checkpoint.with_detector_file`). The manifest records either
    with the source checkpoint, and ``fbnet parity`` compares against PyTorch with the same detector."""
    ckpt_path, out = Path(ckpt_path), Path(out)
    served = {**({"detector_size": detector_size} if detector_size else {}),
              **({"detector_file": str(Path(detector_file).resolve())} if detector_file else {})}
    ckpt = as_exported(load_checkpoint(ckpt_path), served, ckpt_path)
    if detector_file:
        served["detector_file_sha256"] = sha256(Path(detector_file))
    cfg, model, vocab, fusion = load_model(ckpt)
    detector, encoder = frozen_from_checkpoint(cfg, ckpt)
    shared = shared_stage(detector, encoder)
    io = graph_io(model, shared is not None)
    images, block_boxes, fg_mask, captions, source = sample_inputs(ckpt, cfg, detector)
    ids, lengths = (torch.from_numpy(a) for a in vocab.encode_batch(captions, cfg.data.max_words))
    log(f"checking graphs against PyTorch on {source}" +
        (f"; the image encoder starts from the detector's map after MobileNetV2's first {shared} modules"
         if shared else ""))

    image_graph = ImageEncoderGraph(encoder, model, shared).eval()
    text_graph = TextEncoderGraph(model).eval()
    with torch.no_grad():
        first = detector.maps(images)[-1] if shared else images
        blocks = image_graph(first, block_boxes, fg_mask)
        windows = text_graph(ids, lengths)
    graphs = {
        "image_encoder": (image_graph, (first, block_boxes, fg_mask)),
        "text_encoder": (text_graph, (ids, lengths)),
        "scorer": (ScorerGraph(model, fusion).eval(), (fg_mask, *blocks, *windows)),
        # few captions against many images (re-ranking a text query): checked on such a shape
        "reranker": (ScorerGraph(model, fusion, "direct").eval(), (fg_mask, *blocks, *(w[:2] for w in windows))),
    }
    if detector is not None:
        graphs = {"detector": (DetectorGraph(detector, shared is not None).eval(), (images[:1],)), **graphs}

    with atomic_dir(out) as tmp:
        checks, specs = {}, {}
        for name, (module, args) in graphs.items():
            checks[name], specs[name] = export_checked(tmp, name, module, args, io[name], opset, log)
        vocab.save(tmp / "vocab.json")
        engines, note = {}, "not requested (use --fp16 on a GPU host with TensorRT)"
        if fp16:
            ok, why = tensorrt_status()
            if ok:
                engines = build_engines(tmp, specs, cfg.model.detector.max_boxes, cfg.model.levels, fp16=True, log=log)
                note = "built"
            else:
                note = (f"not built: {why}. The ONNX bundle is complete; build the engines later on a GPU "
                        f"host with: fbnet export --engines-only {out}")
                log(f"TensorRT engines {note}")
        m = cfg.model
        manifest = Manifest(
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            precision="float32 graphs" + (", float16 TensorRT engines" if engines else ""),
            opset=opset,
            model=ModelSpec(name=m.name, levels=m.levels, branches=list(m.branches), embed_dim=m.embed_dim,
                            max_boxes=m.detector.max_boxes, score_threshold=m.detector.score_threshold,
                            max_words=cfg.data.max_words, keys=[key_name("", *k).lstrip("_") for k in model.keys],
                            word_keys=[key_name("", *k).lstrip("_") for k in model.word_keys]),
            preprocess=Preprocess(canvas=m.backbone.image_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
            fusion=vars(fusion),
            graphs=specs,
            engines=Engines(note, engines),
            export_check=checks,
            validation_metrics=ckpt.get("val_metrics"),
            source_checkpoint={"path": str(ckpt_path.resolve()), "sha256": sha256(ckpt_path), **served},
            versions={**library_versions(), "onnx": __import__("onnx").__version__,
                      "onnxruntime": __import__("onnxruntime").__version__},
            files={p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        )
        manifest.save(tmp / Manifest.FILE)
    return out


def build_bundle_engines(bundle: str | Path, fp16: bool = True, log=print) -> dict:
    """``fbnet export --engines-only``: add TensorRT engines to an existing bundle on a GPU host."""
    bundle = Path(bundle)
    manifest_path = bundle / Manifest.FILE
    manifest = Manifest.load(manifest_path)
    ok, why = tensorrt_status()
    if not ok:
        raise ExportError(f"cannot build TensorRT engines here: {why}")
    engines = build_engines(bundle, manifest.graphs, manifest.model.max_boxes, manifest.model.levels, fp16=fp16,
                            log=log)
    manifest.engines = Engines("built", engines)
    manifest.precision = "float32 graphs" + (", float16 TensorRT engines" if fp16 else ", float32 engines")
    manifest.files = {p.name: sha256(p) for p in sorted(bundle.iterdir()) if p.is_file() and p.name != Manifest.FILE}
    manifest.save(manifest_path)
    return engines
