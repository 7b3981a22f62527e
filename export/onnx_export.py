"""ONNX export of one graph, with ``onnx.checker`` and a numerical check against PyTorch.

Graphs go through the TorchScript-based exporter (``dynamo=False``), which handles torchvision's
detection models and emits an ONNX ``GRU`` op for the text encoder; opset 17 (RoiAlign with
``half_pixel`` coordinates needs >= 16). Every dynamic axis is named, so TensorRT gets one
optimisation-profile dimension per name.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from fbnet.errors import FbnetError

DEFAULT_OPSET = 17


class ExportError(FbnetError, RuntimeError):
    """A graph failed to export, failed ``onnx.checker``, or disagrees with PyTorch."""


@dataclass
class GraphCheck:
    """Largest differences between ONNX Runtime and PyTorch on the same inputs."""

    max_abs: float
    max_rel: float

    def to_json(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel}


def export_graph(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                 dynamic: dict, opset: int = DEFAULT_OPSET) -> Path:
    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow in torchvision
        try:
            torch.onnx.export(module, args, buf, input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic or None, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        except Exception as exc:
            raise ExportError(f"{path.name}: ONNX export failed: {exc}") from exc
    model = onnx.load_from_string(buf.getvalue())
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker rejected the graph: {exc}") from None
    path.write_bytes(buf.getvalue())
    return path


def compare(path: Path, module: torch.nn.Module, args: tuple, inputs: list[str]) -> GraphCheck:
    """Run ``path`` in ONNX Runtime (CPU) and ``module`` in PyTorch on ``args``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    used = {i.name for i in sess.get_inputs()}  # an input the graph never reads is not in it (e.g. no F-Net: no fg_mask)
    feed = {name: a.numpy() for name, a in zip(inputs, args) if name in used}
    got = sess.run(None, feed)
    with torch.no_grad():
        ref = module(*args)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    max_abs = max_rel = 0.0
    for g, r in zip(got, ref):
        r = r.numpy()
        if g.shape != r.shape:
            raise ExportError(f"{path.name}: output shape {g.shape} differs from PyTorch's {r.shape}")
        if r.size == 0:
            continue
        diff = float(np.abs(g.astype(np.float64) - r).max())
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(np.abs(r).max()), 1e-12))
    return GraphCheck(max_abs, max_rel)


def input_specs(path: Path) -> list[dict]:
    return _specs(onnx.load(str(path), load_external_data=False).graph.input)


def output_specs(path: Path) -> list[dict]:
    return _specs(onnx.load(str(path), load_external_data=False).graph.output)


def _specs(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": dims})
    return out
