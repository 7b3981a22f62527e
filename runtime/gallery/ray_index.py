"""Distributed indexing on Ray (``fbnet-serve-cli index --ray [ADDRESS]``).

The gallery is planned as shards (:func:`fbnet.runtime.gallery.shards.plan_shards`, the same shards
single-process ``index --shard-size`` writes). The shards not yet built become a Ray Data dataset
of jobs, mapped by a pool of actors (``map_batches`` with a callable class and ``concurrency``):
each actor opens the bundle once, with its own ONNX Runtime (or TensorRT) sessions, and builds
whole shards with :func:`~fbnet.runtime.gallery.build.build_gallery`, each written under
``<shard>.partial`` and renamed into place when complete. An interrupted job therefore resumes
shard by shard; ``shards.json`` is written last, by the driver.

On a cluster the gallery directory must be on storage that every node and the driver see (NFS,
a mounted bucket), and the bundle too. ``--ray`` without an address starts a local cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..engine.backends import OnnxRuntimeBackend, select_backend
from ..engine.bundle import open_bundle
from ..engine.retriever import Retriever
from .build import build_gallery
from .shards import finish_shards, plan_shards


class ShardBuilder:
    """A Ray actor's state: one bundle, one backend, shard after shard."""

    def __init__(self, bundle_dir: str, backend: str, threads: int, options: dict):
        bundle = open_bundle(bundle_dir)
        chosen = OnnxRuntimeBackend(bundle, threads=threads) if backend == "onnxruntime" else select_backend(bundle, backend)
        self.retriever, self.options = Retriever(bundle, chosen), options

    def __call__(self, batch: dict) -> dict:
        os.environ.setdefault("TQDM_DISABLE", "1")
        for path, images, captions in zip(batch["path"], batch["images"], batch["captions"]):
            build_gallery(self.retriever, list(images), list(captions), Path(path), **self.options)
        return {"path": batch["path"]}


def index_on_ray(bundle_dir: str | Path, images: list, captions: list[str], out: str | Path, shard_size: int,
                 workers: int = 2, address: str | None = None, backend: str = "onnxruntime",
                 threads_per_worker: int = 1, gpus_per_worker: float = 0.0, log=print, **options) -> Path:
    """Build the sharded gallery ``out`` on Ray with ``workers`` actors; returns ``out``.
    ``address``: a running cluster (``ray://host:10001`` or ``auto``); None starts a local one
    (stopped again at the end). ``gpus_per_worker`` > 0 places actors on GPUs (TensorRT or
    ONNX Runtime's CUDA provider)."""
    import ray

    bundle = open_bundle(bundle_dir)
    jobs = plan_shards(bundle, [str(p) for p in images], captions, out, shard_size)
    todo = [j for j in jobs if not j.done]
    log(f"{len(jobs)} shards, {len(jobs) - len(todo)} already built; {len(todo)} to build on {workers} Ray workers")
    if todo:
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": max(workers * threads_per_worker, 1)}))
        try:
            items = [{"path": str(j.path), "images": [str(p) for p in j.images], "captions": list(j.captions)}
                     for j in todo]
            done = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardBuilder, batch_size=1, concurrency=workers, num_cpus=threads_per_worker, num_gpus=gpus_per_worker,
                fn_constructor_kwargs={"bundle_dir": str(bundle_dir), "backend": backend,
                                       "threads": threads_per_worker, "options": options}).take_all()
            log(f"built {len(done)} shards")
        finally:
            if started:
                ray.shutdown()
    return finish_shards(bundle, out, jobs, shard_size)
