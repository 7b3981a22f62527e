"""Inference backends behind one small interface: ``run(graph, feeds) -> outputs``.

* :class:`OnnxRuntimeBackend`: ONNX Runtime with the best execution providers present
  (TensorRT, then CUDA with ``onnxruntime-gpu``; else CPU).
* :class:`TensorRTBackend`: native TensorRT 10 engines built by ``fbnet export --fp16``, run with
  ``cuda-python`` for device memory. Engines are tagged with TensorRT version and GPU compute
  capability; a mismatch is refused with the command that rebuilds them.

``select_backend(bundle, "auto")`` takes native TensorRT when its engines, package and GPU are
all present, else ONNX Runtime. Nothing here imports torch.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from fbnet.errors import FbnetError

from .bundle import Bundle
from .engine_tags import engine_name, gpu_compute_capability
from .manifest import BundleError, GraphSpec


class BackendUnavailable(FbnetError, RuntimeError):
    """The requested backend cannot run on this host; the message says why and what to do."""

    http_status = 503


class GraphSet(Protocol):
    """What a backend opens graphs from: a folder and the :class:`GraphSpec` of each graph in it."""

    root: object

    def graph(self, name: str) -> GraphSpec | None: ...


class Backend(Protocol):
    name: str
    #: True when the graphs run in reduced (float16) precision.
    half: bool

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def optimized_file(spec: GraphSpec, onnxruntime_version: str) -> str:
    """The file a CPU session should open: the saved optimised graph when it was made from the
    graph's current file by this ONNX Runtime version, else the graph itself."""
    opt = spec.ort_optimized
    if opt and opt.source == spec.file and opt.onnxruntime == onnxruntime_version:
        return opt.file
    return spec.file


class OnnxRuntimeBackend:
    half = False

    def __init__(self, bundle: Bundle | GraphSet, providers: list[str] | None = None, threads: int = 0):
        """``bundle``: a bundle, or any other set of graphs with a ``root`` and ``graph(name)`` (an
        ensemble bundle's shared trunk); ``threads``: intra-op threads per session (0: ONNX
        Runtime's choice)."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        self.providers = providers or [p for p in preferred if p in available]
        self.name = "onnxruntime" + ("" if self.providers[0] == "CPUExecutionProvider"
                                     else f"[{self.providers[0].replace('ExecutionProvider', '')}]")
        self.bundle, self._sessions, self.threads = bundle, {}, threads
        self._ort = ort

    def _session(self, graph: str):
        if graph not in self._sessions:
            spec = self.bundle.graph(graph)
            if spec is None:
                raise BundleError(f"{self.bundle.root}: the bundle has no {graph} graph")
            opts = self._ort.SessionOptions()
            opts.log_severity_level = 3
            # Graphs run one after another (detector -> encoder -> scorer), each in its own session:
            # threads that spin after a run would starve the next session's threads.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.threads:
                opts.intra_op_num_threads = self.threads
            # export's saved optimisations (fbnet.export.ort_optimize) serve CPU sessions of the same
            # ONNX Runtime version; other providers and versions open the plain graph
            cpu = self.providers[0] == "CPUExecutionProvider"
            fname = optimized_file(spec, self._ort.__version__) if cpu else spec.file
            self._sessions[graph] = self._ort.InferenceSession(
                str(self.bundle.root / fname), opts, providers=self.providers)
        return self._sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session(graph).run(None, feeds)


class TensorRTBackend:
    """Native TensorRT engines (one execution context per graph, synchronous)."""

    name = "tensorrt"
    half = True

    def __init__(self, bundle: Bundle):
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise BackendUnavailable(f"TensorRT backend needs the tensorrt and cuda-python packages "
                                     f"(pip install 'fbnet[gpu]'): {exc}") from None
        cc = gpu_compute_capability()
        if cc is None:
            raise BackendUnavailable("TensorRT backend needs an NVIDIA GPU; none is visible")
        files = bundle.manifest.engines.files
        if not files:
            raise BackendUnavailable(f"{bundle.root}: no TensorRT engines; build them with "
                                     f"`fbnet export --engines-only {bundle.root}` on this host")
        self.trt, self.cudart = trt, cudart
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for graph, fname in files.items():
            expected = engine_name(graph, trt.__version__, cc)
            if fname != expected:
                raise BackendUnavailable(
                    f"{bundle.root / fname}: built for another TensorRT version or GPU (this host needs "
                    f"{expected}); rebuild with `fbnet export --engines-only {bundle.root}`")
            engine = runtime.deserialize_cuda_engine((bundle.root / fname).read_bytes())
            if engine is None:
                raise BackendUnavailable(f"{bundle.root / fname}: TensorRT could not load the engine")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()

    def _check(self, result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        trt, cudart = self.trt, self.cudart
        engine, ctx = self.engines[graph], self.contexts[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        buffers = []
        try:
            for n in inputs:
                host = np.ascontiguousarray(feeds[n].astype(trt.nptype(engine.get_tensor_dtype(n))))
                ctx.set_input_shape(n, host.shape)
                ptr = self._check(cudart.cudaMalloc(max(host.nbytes, 1)))
                buffers.append(ptr)
                self._check(cudart.cudaMemcpy(ptr, host.ctypes.data, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
                ctx.set_tensor_address(n, ptr)
            results = []
            for n in outputs:
                host = np.empty(tuple(ctx.get_tensor_shape(n)), dtype=trt.nptype(engine.get_tensor_dtype(n)))
                ptr = self._check(cudart.cudaMalloc(max(host.nbytes, 1)))
                buffers.append(ptr)
                ctx.set_tensor_address(n, ptr)
                results.append((host, ptr))
            if not ctx.execute_async_v3(0):
                raise RuntimeError(f"TensorRT failed to run {graph}")
            self._check(cudart.cudaStreamSynchronize(0))
            for host, ptr in results:
                self._check(cudart.cudaMemcpy(host.ctypes.data, ptr, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
            return [h.astype(np.float32) if h.dtype == np.float16 else h for h, _ in results]
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)


BACKENDS = ("auto", "onnxruntime", "tensorrt")


def select_backend(bundle: Bundle, name: str = "auto", threads: int | None = None) -> Backend:
    """The backend called ``name``; ``auto`` prefers native TensorRT, then ONNX Runtime."""
    threads = threads if threads is not None else int(os.environ.get("FBNET_THREADS", "0"))
    if name == "tensorrt":
        return TensorRTBackend(bundle)
    if name == "auto" and bundle.manifest.engines.files:
        try:
            return TensorRTBackend(bundle)
        except BackendUnavailable:
            pass
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return OnnxRuntimeBackend(bundle, threads=threads)
