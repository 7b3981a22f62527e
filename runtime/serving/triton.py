"""FB-Net search on Triton Inference Server: the same :class:`SearchService` as the built-in server.

``fbnet_search_text`` and ``fbnet_search_image`` are Python-backend models
(:class:`TritonPythonModel`: ``initialize`` / ``execute``) that run the two-stage search. They
come two ways:

* **Model repository** (``fbnet export --triton REPO``, :mod:`fbnet.export.triton`): beside the
  bundle's graphs as ``onnxruntime_onnx`` (and ``tensorrt_plan``) models, the search models run
  with :class:`BLSBackend`, whose ``run(graph, feeds)`` is a BLS call to the graph's model, so
  Triton batches and places the graphs and the search logic is the runtime's own.
  An ensemble bundle's repository holds every member's graphs (``fbnet_member<i>_<graph>``).
* **PyTriton's server** (``fbnet-serve-cli triton``, :func:`serve_triton`): the Triton server
  binary and Python backend that ``nvidia-pytriton`` ships, given a repository of the two search
  models alone, which run the graphs with ONNX Runtime (or TensorRT) inside their backend
  process. They are in the repository when the server starts, so ``/v2/health/ready`` answers 200
  only once both are loaded and warm.

Request: ``text`` (or ``image``: the file's bytes) as BYTES ``[1]``, optional ``top_k``,
``shortlist`` and ``nprobe`` INT32 ``[1]`` (``shortlist`` -1: the server's default; 0: exhaustive;
``nprobe``: IVF lists the first stage visits, -1 the index's default). Answer: ``result``, BYTES
``[1]``: the JSON the built-in server puts in ``results[0]``. A bad query (an empty caption, an
undecodable image, ``top_k`` 0) fails alone, as a request error with Triton's ``INVALID_ARG``
code (HTTP 400, gRPC ``INVALID_ARGUMENT``); the other requests of its batch are answered.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from fbnet.errors import FbnetError
from fbnet.preprocess import MAX_PIXELS, ImageError, load_image

from ..engine.manifest import GraphSpec
from ..engine.retriever import QueryError
from .service import ImageQuery, SearchService, TextQuery

GRAPH_MODEL = "fbnet_{graph}"
#: an ensemble bundle's graphs: one set of models per member
MEMBER_GRAPH_MODEL = "fbnet_member{member}_{graph}"
SEARCH_INPUTS = {kind: [(kind, "TYPE_STRING", False), ("top_k", "TYPE_INT32", True),
                        ("shortlist", "TYPE_INT32", True), ("nprobe", "TYPE_INT32", True)] for kind in ("text", "image")}
SEARCH_OUTPUTS = [("result", "TYPE_STRING", False)]
SEARCH_MODEL = "fbnet_search_{kind}"
MODEL_PY = '"""Triton Python backend entry point: fbnet two-stage search (see fbnet.runtime.serving.triton)."""\n' \
           "from fbnet.runtime.serving.triton import TritonPythonModel  # noqa: F401\n"


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


def result_json(result: dict) -> bytes:
    return json.dumps(result).encode()


def triton_error(pb_utils, exc: Exception):
    """A request's Triton error: ``INVALID_ARG`` (HTTP 400) for a bad query, ``UNAVAILABLE`` (503)
    or ``INTERNAL`` (500) for the rest (a Python backend without error codes: its default)."""
    status = exc.http_status if isinstance(exc, FbnetError) else 500
    code = "INVALID_ARG" if status < 500 else "UNAVAILABLE" if status == 503 else "INTERNAL"
    error_type = pb_utils.TritonError
    return error_type(str(exc), getattr(error_type, code)) if hasattr(error_type, code) else error_type(str(exc))


def graph_model(graph: str, member: int | None = None) -> str:
    """The Triton model that serves ``graph`` (of ensemble member ``member``)."""
    return GRAPH_MODEL.format(graph=graph) if member is None else MEMBER_GRAPH_MODEL.format(member=member, graph=graph)


# -- the search models (Python backend) -------------------------------------------------------------
class BLSBackend:
    """A runtime backend whose graphs are models of the same Triton server (BLS calls)."""

    name = "triton-bls"
    half = False

    def __init__(self, bundle, pb_utils, suffix: str = "", member: int | None = None):
        """``member``: the bundle is that member of an ensemble (its graphs' models are named so)."""
        self.pb, self.suffix, self.member = pb_utils, suffix, member
        self.specs = bundle.manifest.graphs

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        spec = self.specs[graph]
        batched = batch_axis(spec) is not None
        inputs = [self.pb.Tensor(t.name, np.ascontiguousarray(
                      feeds[t.name].reshape(-1, 1) if batched and len(t.shape) == 1 else feeds[t.name]))
                  for t in spec.inputs]
        names = [t.name for t in spec.outputs]
        response = self.pb.InferenceRequest(model_name=graph_model(graph, self.member) + self.suffix,
                                            requested_output_names=names, inputs=inputs).exec()
        if response.has_error():
            raise RuntimeError(f"{graph}: {response.error().message()}")
        return [self.pb.get_output_tensor_by_name(response, n).as_numpy() for n in names]


class TritonPythonModel:
    """``fbnet_search_text`` / ``fbnet_search_image`` (``model.py`` of the repository imports this).
    Its ``parameters``: ``kind``, ``bundle``, ``gallery``, ``shortlist``, and ``backend``: ``bls``
    (the graphs are models of this server; ``graph_suffix`` picks ``_trt`` ones) or a runtime
    backend (``onnxruntime``, ``tensorrt``, ``auto``; with ``rerank_lanes``), then warmed here."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415  (only inside Triton)

        from ..engine.bundle import open_bundle
        from ..engine.ensemble import EnsembleRetriever, is_ensemble_bundle, open_ensemble_bundle, open_retriever
        from ..engine.retriever import Retriever
        from ..gallery import open_gallery

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.pb, self.kind = pb_utils, params["kind"]
        path, backend, suffix = params["bundle"], params.get("backend", "bls"), params.get("graph_suffix", "")
        self.max_pixels = int(params.get("max_pixels", MAX_PIXELS))
        if backend != "bls":
            retriever = open_retriever(path, backend)
        elif is_ensemble_bundle(path):
            ensemble = open_ensemble_bundle(path)
            retriever = EnsembleRetriever(ensemble, [Retriever(b, BLSBackend(b, pb_utils, suffix, i))
                                                     for i, b in enumerate(ensemble.members)])
        else:
            bundle = open_bundle(path)
            retriever = Retriever(bundle, BLSBackend(bundle, pb_utils, suffix))
        self.service = SearchService(retriever, open_gallery(params["gallery"], retriever.bundle),
                                     int(params["shortlist"]), int(params.get("rerank_lanes", 0)))
        if backend != "bls":  # a BLS model's graphs may still be loading
            self.service.warm()

    def execute(self, requests):
        pb, per_request, queries = self.pb, [], []
        for request in requests:
            tensors = {name: t.as_numpy() for name, _, _ in SEARCH_INPUTS[self.kind]
                       if (t := pb.get_input_tensor_by_name(request, name)) is not None}
            rows = parse_rows(self.kind, tensors, self.service.retriever.bundle.canvas, self.max_pixels)
            per_request.append(len(rows))
            queries += rows
        results, responses, start = answer(self.service, self.kind, queries), [], 0
        for n in per_request:
            mine, start = results[start: start + n], start + n
            failed = next((r for r in mine if isinstance(r, Exception)), None)
            if failed is not None:
                responses.append(pb.InferenceResponse(error=triton_error(pb, failed)))
            else:
                out = np.array([[result_json(r)] for r in mine], dtype=np.object_)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("result", out)]))
        return responses


def search_config(kind: str, params: dict[str, str], max_batch: int, max_wait_us: int) -> str:
    """``config.pbtxt`` of ``fbnet_search_<kind>``: Python backend, dynamic batching, ``params``."""
    def tensors(specs):
        return ",\n".join("  {\n" + f'    name: "{n}"\n    data_type: {t}\n    dims: [ 1 ]' +
                          ("\n    optional: true" if opt else "") + "\n  }" for n, t, opt in specs)

    return "\n".join([
        f'name: "{SEARCH_MODEL.format(kind=kind)}"', 'backend: "python"', f"max_batch_size: {max_batch}",
        "input [\n" + tensors(SEARCH_INPUTS[kind]) + "\n]", "output [\n" + tensors(SEARCH_OUTPUTS) + "\n]",
        "instance_group [ { count: 1, kind: KIND_CPU } ]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_wait_us} }}",
        *(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in {"kind": kind, **params}.items()),
    ]) + "\n"


def write_search_models(repository: Path, params: dict[str, str], max_batch: int, max_wait_us: int) -> None:
    """``fbnet_search_text`` and ``fbnet_search_image`` (``model.py`` + ``config.pbtxt``) in ``repository``."""
    for kind in ("text", "image"):
        model = Path(repository) / SEARCH_MODEL.format(kind=kind)
        (model / "1").mkdir(parents=True)
        (model / "1" / "model.py").write_text(MODEL_PY)
        (model / "config.pbtxt").write_text(search_config(kind, params, max_batch, max_wait_us))


# -- PyTriton's server ------------------------------------------------------------------------------
class RunningTriton:
    """A Triton server started by :func:`serve_triton`; :meth:`stop` ends it and removes its repository."""

    def __init__(self, triton, repository: Path):
        self.triton, self.repository = triton, repository

    def stop(self) -> None:
        try:
            self.triton.stop()
        finally:
            shutil.rmtree(self.repository, ignore_errors=True)


def serve_triton(bundle: str | Path, gallery: str | Path, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, shortlist: int = 100, backend: str = "auto",
                 max_batch: int = 64, max_wait_us: int = 0, rerank_lanes: int = 0, log_file: str | None = None,
                 max_pixels: int = MAX_PIXELS) -> RunningTriton:
    """Start Triton (the server ``nvidia-pytriton`` ships) with a repository of the two search models
    over ``bundle`` and ``gallery``; return once both are loaded and warm (``/v2/health/ready`` is
    200 from then on, not before). Needs ``nvidia-pytriton`` (numpy < 2: see ``constraints-pytriton.txt``)."""
    # Triton's Python-backend stub links libpython: make it this interpreter's, not another install's
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    from pytriton.triton import Triton, TritonConfig

    repository = Path(tempfile.mkdtemp(prefix="fbnet-triton-"))
    params = {"bundle": str(Path(bundle).resolve()), "gallery": str(Path(gallery).resolve()),
              "shortlist": str(shortlist), "backend": backend, "rerank_lanes": str(rerank_lanes),
              "max_pixels": str(max_pixels)}
    write_search_models(repository, params, max_batch, max_wait_us)
    config = TritonConfig(model_repository=repository, http_address=host, http_port=http_port, grpc_address=host,
                          grpc_port=grpc_port, metrics_address=host, metrics_port=metrics_port, allow_metrics=True,
                          allow_gpu_metrics=False, strict_readiness=True, exit_timeout_secs=5, log_file=log_file)
    triton = Triton(config=config)
    try:
        triton.run()  # returns when the server is ready: the repository's models loaded
    except BaseException:
        RunningTriton(triton, repository).stop()
        raise
    return RunningTriton(triton, repository)
