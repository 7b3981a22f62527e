"""A Triton Inference Server model repository from a bundle (``fbnet export --triton REPO``).

::

    REPO/
      fbnet_detector/       config.pbtxt  1/model.onnx     onnxruntime_onnx, static 1x3xSxS image
      fbnet_image_encoder/  config.pbtxt  1/model.onnx     dynamic batching over images
      fbnet_text_encoder/   config.pbtxt  1/model.onnx     dynamic batching over captions
      fbnet_scorer/         config.pbtxt  1/model.onnx     images x captions (two free axes: no batcher)
      fbnet_reranker/       config.pbtxt  1/model.onnx     the same scores for few captions (re-ranking)
      fbnet_<graph>_trt/    config.pbtxt  1/model.plan     tensorrt_plan, when the bundle has engines
      fbnet_search_text/    config.pbtxt  1/model.py       Python backend: two-stage search (BLS)
      fbnet_search_image/   config.pbtxt  1/model.py

An ensemble bundle's repository holds each member's graph models as ``fbnet_member<i>_<graph>``
(and ``_trt``); its search models sum the members' scores (:mod:`fbnet.runtime.engine.ensemble`).

Every ONNX model's inputs and outputs are the graph's own (names, types, shapes from the bundle's
manifest). A graph whose inputs and outputs all lead with the same dynamic axis gets
``max_batch_size`` and a dynamic batcher; a 1-D input such as ``lengths`` is declared ``[1]`` with
``reshape { shape: [] }``. Instances are ``KIND_AUTO`` (GPU where there is one), and the ONNX
Runtime models ask for the TensorRT execution accelerator in FP16 on GPU instances.

The search models run :class:`fbnet.runtime.serving.service.SearchService`, the built-in server's code,
with a backend whose ``run`` is a BLS call to the models above (:mod:`fbnet.runtime.serving.triton`);
their ``parameters`` name the bundle and gallery directories as Triton's host sees them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fbnet.atomic import atomic_dir
from fbnet.errors import FbnetError
from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.engine.ensemble import is_ensemble_bundle, open_ensemble_bundle
from fbnet.runtime.engine.manifest import EnsembleGalleryMeta, GalleryMeta, GraphSpec, ShardsMeta, TensorSpec
from fbnet.runtime.gallery import open_gallery
from fbnet.runtime.serving.triton import batch_axis, graph_model, write_search_models

TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
         "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "object": "TYPE_STRING", "bytes": "TYPE_STRING"}


class TritonExportError(FbnetError, ValueError):
    """The bundle cannot be written as a Triton model repository; the message says why."""


def _tensor(t: TensorSpec, batched: bool) -> str:
    dims = [-1 if isinstance(d, str) else int(d) for d in t.shape]
    if batched:
        dims = dims[1:]
    lines = [f'    name: "{t.name}"', f"    data_type: {TYPES[t.dtype]}",
             f"    dims: [ {', '.join(map(str, dims or [1]))} ]"]
    if not dims:
        lines.append("    reshape: { shape: [ ] }")
    return "  {\n" + "\n".join(lines) + "\n  }"


def graph_config(name: str, spec: GraphSpec, platform: str, max_batch: int, instances: int) -> str:
    """``config.pbtxt`` for one graph (``platform``: ``onnxruntime_onnx`` or ``tensorrt_plan``)."""
    batched = batch_axis(spec) is not None
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch if batched else 0}",
             "input [\n" + ",\n".join(_tensor(t, batched) for t in spec.inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor(t, batched) for t in spec.outputs) + "\n]",
             f"instance_group [ {{ count: {instances}, kind: KIND_AUTO }} ]"]
    if batched:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 500 }")
    if platform == "onnxruntime_onnx":
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator: [ {\n'
                     '  name: "tensorrt"\n'
                     '  parameters { key: "precision_mode" value: "FP16" }\n'
                     '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
                     '  parameters { key: "trt_engine_cache_enable" value: "1" }\n} ] } }')
    else:
        lines.append('default_model_filename: "model.plan"')
    return "\n".join(lines) + "\n"


def write_triton_repository(bundle_dir: str | Path, out: str | Path, gallery: str | Path | None = None,
                            max_batch: int = 16, instances: int = 1, shortlist: int = 100,
                            bundle_path: str | None = None, gallery_path: str | None = None) -> Path:
    """Write the repository to ``out`` (atomically). ``gallery`` adds the two search models;
    ``bundle_path``/``gallery_path`` are those directories as the Triton host sees them (default:
    their absolute paths here)."""
    ensemble = is_ensemble_bundle(bundle_dir)
    bundle = open_ensemble_bundle(bundle_dir) if ensemble else open_bundle(bundle_dir)
    models = list(enumerate(bundle.members)) if ensemble else [(None, bundle)]
    engines = all(b.manifest.engines.files for _, b in models)
    if gallery is not None:
        records = (GalleryMeta.FILE, ShardsMeta.FILE, EnsembleGalleryMeta.FILE)
        if not any((Path(gallery) / f).is_file() for f in records):
            raise TritonExportError(f"{gallery}: not a gallery (no gallery.json); build one with fbnet-serve-cli index")
        open_gallery(gallery, bundle)  # made by this bundle's encoders, and whole
    with atomic_dir(Path(out)) as tmp:
        for member, b in models:
            for graph, spec in b.manifest.graphs.items():
                name = graph_model(graph, member)
                (tmp / name / "1").mkdir(parents=True)
                shutil.copy(b.root / spec.file, tmp / name / "1" / "model.onnx")
                config = graph_config(name, spec, "onnxruntime_onnx", max_batch, instances)
                (tmp / name / "config.pbtxt").write_text(config)
                if graph in b.manifest.engines.files:
                    trt = name + "_trt"
                    (tmp / trt / "1").mkdir(parents=True)
                    shutil.copy(b.root / b.manifest.engines.files[graph], tmp / trt / "1" / "model.plan")
                    config = graph_config(trt, spec, "tensorrt_plan", max_batch, instances)
                    (tmp / trt / "config.pbtxt").write_text(config)
        if gallery is not None:
            params = {"bundle": str(bundle_path or Path(bundle_dir).resolve()),
                      "gallery": str(gallery_path or Path(gallery).resolve()), "shortlist": str(shortlist),
                      "backend": "bls", "graph_suffix": "_trt" if engines else ""}
            write_search_models(tmp, params, max_batch, max_wait_us=1000)
    return Path(out)
