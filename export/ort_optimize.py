"""ONNX Runtime graph optimisations done once at export and saved with the bundle.

ONNX Runtime rewrites every graph when a session opens (constant folding, node fusions such as
MatMul + Add -> Gemm, GELU/LayerNorm/attention fusions, QDQ -> QLinear ops for INT8 graphs). The
*extended* level's result is portable across CPUs for one ONNX Runtime version, so it is saved
beside each graph (``<graph>.ort.onnx``) and the manifest records the ONNX Runtime version and the
file it came from; the runtime's CPU sessions open the saved graph when both match (the
hardware-specific layout passes of level *all* still run at load), else the plain graph. See
onnxruntime's "Graph optimizations" documentation (offline mode, ``optimized_model_filepath``).
"""

from __future__ import annotations

from pathlib import Path

from fbnet.runtime.engine.manifest import OptimizedGraph


def save_optimized(root: Path, graph: str, source: str) -> OptimizedGraph:
    """Write ``<graph>.ort.onnx`` for the graph file ``source`` in ``root``; return the manifest record."""
    import onnxruntime as ort

    target = root / f"{graph}.ort.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(target)
    opts.log_severity_level = 3
    ort.InferenceSession(str(root / source), opts, providers=["CPUExecutionProvider"])
    return OptimizedGraph(file=target.name, source=source, level="extended", onnxruntime=ort.__version__)

