"""FB-Net search on Triton Inference Server: the same :class:`SearchService` as the built-in server.

Two ways in, sharing the request format and the conversion below:

* **Model repository** (``fbnet export --triton REPO``, :mod:`fbnet.export.triton`): the bundle's graphs
  as ``onnxruntime_onnx`` (and ``tensorrt_plan``) models, and ``fbnet_search_text`` /
  ``fbnet_search_image`` as Python-backend models (:class:`TritonPythonModel`). Those run the
  two-stage search with :class:`BLSBackend`, whose ``run(graph, feeds)`` is a BLS call to the graph's
  model, so Triton batches and places the graphs and the search logic is the runtime's own.
* **PyTriton** (``fbnet-serve-cli triton``, :func:`serve_pytriton`): Triton's server binary runs
  the runtime's search as a Python model, with ONNX Runtime sessions in this process.

Request: ``text`` (or ``image``: the file's bytes) as BYTES ``[1]``, optional ``top_k``,
``shortlist`` and ``nprobe`` INT32 ``[1]`` (``shortlist`` -1: the server's default; 0: exhaustive;
``nprobe``: IVF lists the first stage visits, -1 the index's default). Answer:
``result``, BYTES ``[1]``: the JSON the built-in server puts in ``results[0]`` (an error is
``{"error": ...}`` in the Python-backend models' per-request error instead).
"""

from __future__ import annotations

import io
import json
import os
import sysconfig

import numpy as np

from fbnet.preprocess import MAX_PIXELS, ImageError, load_image

from ..engine.manifest import GraphSpec
from ..engine.retriever import QueryError
from .service import ImageQuery, SearchService, TextQuery

GRAPH_MODEL = "fbnet_{graph}"
SEARCH_INPUTS = {kind: [(kind, "TYPE_STRING", False), ("top_k", "TYPE_INT32", True),
                        ("shortlist", "TYPE_INT32", True), ("nprobe", "TYPE_INT32", True)] for kind in ("text", "image")}
SEARCH_OUTPUTS = [("result", "TYPE_STRING", False)]


def batch_axis(spec: GraphSpec) -> str | None:
    """The dynamic axis every input and output leads with, if they share one (Triton can batch it)."""
    firsts = {tuple(t.shape[:1]) for t in spec.inputs + spec.outputs}
    if len(firsts) == 1:
        (first,) = firsts
        if first and isinstance(first[0], str):
            return first[0]
    return None


# -- requests and answers ---------------------------------------------------------------------------
def parse_rows(kind: str, tensors: dict[str, np.ndarray], canvas: int, max_pixels: int = MAX_PIXELS) -> list:
    """One query (or the exception that makes it unusable) per row of a request's tensors; an image
    declaring over ``max_pixels`` is refused from its header, as the built-in server does."""
    rows = np.asarray(tensors[kind]).reshape(len(tensors[kind]), -1)[:, 0]
    top_k = _column(tensors.get("top_k"), len(rows), 5)
    shortlist = _column(tensors.get("shortlist"), len(rows), -1)
    nprobe = _column(tensors.get("nprobe"), len(rows), -1)
    out = []
    for value, k, s, p in zip(rows, top_k, shortlist, nprobe):
        data = value if isinstance(value, bytes) else str(value).encode()
        s, p = (None if v < 0 else int(v) for v in (s, p))
        if k < 1:
            out.append(QueryError(f"top_k must be at least 1, not {k}"))
        elif p == 0:
            out.append(QueryError("nprobe must be at least 1 (or -1: the index's default)"))
        elif kind == "text":
            out.append(TextQuery(data.decode("utf-8", errors="replace"), int(k), s, nprobe=p))
        else:
            try:
                out.append(ImageQuery(load_image(io.BytesIO(data), canvas, name="uploaded image",
                                                 max_pixels=max_pixels), int(k), s, nprobe=p))
            except ImageError as exc:
                out.append(exc)
    return out


def _column(values, n: int, default: int) -> list[int]:
    if values is None:
        return [default] * n
    return [int(v) for v in np.asarray(values).reshape(n, -1)[:, 0]]


def answer(service: SearchService, kind: str, queries: list) -> list[dict | Exception]:
    """Run the usable queries as one batch; unusable ones keep their exception."""
    usable = [i for i, q in enumerate(queries) if not isinstance(q, Exception)]
    search = service.search_texts if kind == "text" else service.search_images
    results = search([queries[i] for i in usable]) if usable else []
    out = list(queries)
    for i, r in zip(usable, results):
        out[i] = r
    return out


def result_json(result: dict | Exception) -> bytes:
    return json.dumps({"error": str(result)} if isinstance(result, Exception) else result).encode()


# -- Python backend (BLS) ---------------------------------------------------------------------------
class BLSBackend:
    """A runtime backend whose graphs are models of the same Triton server (BLS calls)."""

    name = "triton-bls"
    half = False

    def __init__(self, bundle, pb_utils, suffix: str = ""):
        self.pb, self.suffix = pb_utils, suffix
        self.specs = bundle.manifest.graphs

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        spec = self.specs[graph]
        batched = batch_axis(spec) is not None
        inputs = [self.pb.Tensor(t.name, np.ascontiguousarray(
                      feeds[t.name].reshape(-1, 1) if batched and len(t.shape) == 1 else feeds[t.name]))
                  for t in spec.inputs]
        names = [t.name for t in spec.outputs]
        response = self.pb.InferenceRequest(model_name=GRAPH_MODEL.format(graph=graph) + self.suffix,
                                            requested_output_names=names, inputs=inputs).exec()
        if response.has_error():
            raise RuntimeError(f"{graph}: {response.error().message()}")
        return [self.pb.get_output_tensor_by_name(response, n).as_numpy() for n in names]


class TritonPythonModel:
    """``fbnet_search_text`` / ``fbnet_search_image`` (``model.py`` of the repository imports this)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415  (only inside Triton)

        from ..engine.bundle import open_bundle
        from ..engine.retriever import Retriever
        from ..gallery.shards import open_gallery

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.pb, self.kind = pb_utils, params["kind"]
        bundle = open_bundle(params["bundle"])
        retriever = Retriever(bundle, BLSBackend(bundle, pb_utils, params["graph_suffix"]))
        self.service = SearchService(retriever, open_gallery(params["gallery"], bundle), int(params["shortlist"]))

    def execute(self, requests):
        pb, per_request, queries = self.pb, [], []
        for request in requests:
            tensors = {name: t.as_numpy() for name, _, _ in SEARCH_INPUTS[self.kind]
                       if (t := pb.get_input_tensor_by_name(request, name)) is not None}
            rows = parse_rows(self.kind, tensors, self.service.retriever.bundle.canvas)
            per_request.append(len(rows))
            queries += rows
        results, responses, start = answer(self.service, self.kind, queries), [], 0
        for n in per_request:
            mine, start = results[start: start + n], start + n
            failed = next((r for r in mine if isinstance(r, Exception)), None)
            if failed is not None:
                responses.append(pb.InferenceResponse(error=pb.TritonError(str(failed))))
            else:
                out = np.array([[result_json(r)] for r in mine], dtype=np.object_)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("result", out)]))
        return responses


# -- PyTriton ---------------------------------------------------------------------------------------
def serve_pytriton(service: SearchService, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                   metrics_port: int = 8002, max_batch: int = 64, max_wait_us: int = 0, log_file: str | None = None):
    """Start Triton (PyTriton) serving ``fbnet_search_text`` and ``fbnet_search_image`` and return the
    running ``Triton`` object (``.stop()`` ends it). Needs ``nvidia-pytriton`` (numpy < 2: see
    ``constraints-pytriton.txt``)."""
    # Triton's Python-backend stub links libpython: make it this interpreter's, not another install's
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, allow_metrics=True,
                          allow_gpu_metrics=False, exit_timeout_secs=5, log_file=log_file)
    triton = Triton(config=config)
    canvas = service.retriever.bundle.canvas
    for kind in ("text", "image"):
        def infer(requests, kind=kind):
            per_request = [parse_rows(kind, dict(r.items()), canvas) for r in requests]
            results = iter(answer(service, kind, [q for rows in per_request for q in rows]))
            return [{"result": np.array([[result_json(next(results))] for _ in rows], dtype=np.object_)}
                    for rows in per_request]

        triton.bind(model_name=f"fbnet_search_{kind}", infer_func=infer,
                    inputs=[Tensor(name=n, dtype=np.bytes_ if t == "TYPE_STRING" else np.int32, shape=(1,),
                                   optional=opt) for n, t, opt in SEARCH_INPUTS[kind]],
                    outputs=[Tensor(name="result", dtype=np.bytes_, shape=(1,))],
                    config=ModelConfig(max_batch_size=max_batch,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=max_wait_us)),
                    strict=True)
    triton.run()
    return triton
