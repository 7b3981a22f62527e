"""INT8 graphs for CPU serving (``fbnet export --int8``): ONNX Runtime static quantization.

The graphs named (``QUANTIZABLE``: the detector and the image encoder, the cost of an image
query) are quantized to QDQ form: int8 weights per output channel, uint8 activations, their ranges
calibrated (``minmax``, ``percentile`` or ``entropy``) on training images run through the float
bundle's own chain: the detector's inputs are the decoded canvases, the image encoder's the same
canvases with the window boxes laid from the float detector's detections
(:meth:`Retriever.image_encoder_feeds`). Only ``Conv``, ``MatMul`` and ``Gemm`` are quantized;
box post-processing and RoIAlign stay float. The text encoder (a GRU) and the scorers stay
float32: ORT's static quantization does not cover the GRU op, and the scorer's cosines are what
ranks.

The default is the detector alone (``DEFAULT_GRAPHS``), as measured on the Flickr8k recipe
(BENCHMARKS.md, "INT8 graphs" and "Gallery storage"): the INT8 detector runs 1.9x faster than
float32 and costs 0.2-0.3 dev R@sum, while the INT8 MobileNetV2 image encoder's block embeddings
drift (mean cosine to float32 0.97-0.98 with min/max or percentile calibration), which costs
19.5-27 R@sum: the cross attention ranks on small differences between blocks.

The quantized graphs are written beside the float ones (``<graph>.int8.onnx``); the manifest
points the graph at them (``file``), keeps ``float_file``, and records how they were made under
``quantization``. ``fbnet parity`` then reports the MAP and R@K change against PyTorch float32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from fbnet.errors import FbnetError
from fbnet.preprocess import load_image
from fbnet.runtime.engine.backends import OnnxRuntimeBackend
from fbnet.runtime.engine.bundle import open_bundle, sha256
from fbnet.runtime.engine.retriever import Retriever

from .ort_optimize import save_optimized


QUANTIZABLE = ("detector", "image_encoder")
DEFAULT_GRAPHS = ("detector",)
#: ``--calibration-method`` names and ONNX Runtime's ``CalibrationMethod`` members
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


class QuantizeError(FbnetError, ValueError):
    """The bundle cannot be quantized; the message says why."""


def calibration_feeds(retriever: Retriever, images: list[Path], graphs: tuple[str, ...],
                      batch: int = 8) -> dict[str, list[dict]]:
    """Inputs of each graph in ``graphs`` (that the bundle has) for the calibration images, from
    the float graphs."""
    canvases = np.stack([load_image(p, retriever.bundle.canvas) for p in images])
    feeds = {}
    if "detector" in graphs and retriever.bundle.graph("detector"):
        feeds["detector"] = [{"image": c[None]} for c in canvases]
    if "image_encoder" in graphs:
        feeds["image_encoder"] = [retriever.image_encoder_feeds(canvases[i: i + batch])
                                  for i in range(0, len(canvases), batch)]
    return feeds


def quantize_bundle(bundle_dir: str | Path, images: list[Path], graphs: tuple[str, ...] = DEFAULT_GRAPHS,
                    method: str = "minmax", log=print) -> dict:
    """Quantize the bundle's ``graphs`` in place, ranges calibrated by ``method``; returns the
    manifest's record."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict]):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    if not images:
        raise QuantizeError("no calibration images: INT8 needs training images to calibrate on")
    unknown = sorted(set(graphs) - set(QUANTIZABLE))
    if unknown or not graphs:
        raise QuantizeError(f"cannot quantize {', '.join(unknown) or '(no graph named)'}: "
                            f"INT8 covers {', '.join(QUANTIZABLE)}")
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; expected one of {', '.join(CALIBRATION_METHODS)}")
    calibrate = getattr(CalibrationMethod, CALIBRATION_METHODS[method])
    bundle = open_bundle(bundle_dir)
    manifest = bundle.manifest
    if manifest.quantization:
        raise QuantizeError(f"{bundle.root}: already quantized ({manifest.quantization['graphs']})")
    feeds = calibration_feeds(Retriever(bundle, OnnxRuntimeBackend(bundle)), images, graphs)
    if not feeds:
        raise QuantizeError(f"{bundle.root}: has none of the graphs to quantize ({', '.join(graphs)})")
    done = []
    for graph, graph_feeds in feeds.items():
        spec = manifest.graphs[graph]
        source, target = bundle.root / spec.file, bundle.root / f"{graph}.int8.onnx"
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(target), Reader(graph_feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate)
        spec.float_file, spec.file = spec.file, target.name
        spec.ort_optimized = save_optimized(bundle.root, f"{graph}.int8", spec.file)
        for made in (target.name, spec.ort_optimized.file):
            manifest.files[made] = sha256(bundle.root / made)
        log(f"  {target.name:24s} {source.stat().st_size / 1e6:6.1f} MB -> {target.stat().st_size / 1e6:6.1f} MB")
        done.append(graph)
    manifest.quantization = {"graphs": done, "format": "QDQ", "weights": "int8, per channel",
                                "activations": "uint8", "ops": ["Conv", "MatMul", "Gemm"],
                                "calibration": {"method": method, "images": len(images),
                                                "first": str(images[0])}}
    manifest.precision = f"int8 {', '.join(done)}; float32 others"
    manifest.save(bundle.root / manifest.FILE)
    return manifest.quantization
