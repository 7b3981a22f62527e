"""``fbnet-serve-cli``: retrieval from an exported bundle, without torch.

::

    fbnet-serve-cli index --bundle B --images DIR --captions FILE --out GALLERY
    fbnet-serve-cli query query.jpg [more.jpg ...] --bundle B --gallery G [--top-k 5] [--json]
    fbnet-serve-cli query --text "a dog runs on grass" [--text ...] --bundle B --gallery G
    fbnet-serve-cli serve --bundle B --gallery G [--host 127.0.0.1] [--port 8080]
    fbnet-serve-cli triton-env [DIR]                      # the PyTriton environment (numpy < 2)
    DIR/bin/fbnet-serve-cli triton --bundle B --gallery G [--http-port 8000]

Queries use two-stage search (:mod:`fbnet.runtime.search.searcher`; ``--exhaustive`` scores every item).
``serve`` keeps the bundle and gallery loaded and answers HTTP + JSON with micro-batching
(:mod:`fbnet.runtime.serving.server`); ``triton`` serves the same search through Triton Inference Server
(:mod:`fbnet.runtime.serving.triton`).

``query`` is also the default: a first argument that is not a command name (an image path,
``--text``, ``--bundle``) runs it, so ``fbnet-serve-cli query.jpg --bundle B --gallery G`` works.
``--bundle`` may be an ensemble bundle (``fbnet export ENSEMBLE.yaml``): ``index`` then writes one
gallery per member (:mod:`fbnet.runtime.gallery.ensemble`) and the others search them as one.
Every expected failure (:class:`~fbnet.errors.FbnetError`) is one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import click

from fbnet.command import FbnetGroup
from fbnet.preprocess import MAX_PIXELS

from .engine.backends import BACKENDS
from .engine.ensemble import is_ensemble_bundle, open_ensemble_bundle, open_retriever
from .gallery import open_gallery
from .gallery.build import build_gallery, list_images, read_captions
from .gallery.ensemble import build_ensemble_gallery
from .gallery.gallery import GalleryError
from .gallery.shards import build_sharded
from .gallery.stores import STORES
from .search.searcher import DEFAULT_SHORTLIST, Searcher, hits_json
from .serving.http_limits import MAX_HEADER_BYTES
from .serving.service import SearchService

DEFAULT_COMMAND = "query"


class ServeCli(FbnetGroup):
    """The command group; a first argument that is not a command name runs ``query`` with all the
    arguments (``fbnet-serve-cli IMAGE ...`` and ``fbnet-serve-cli --text ...`` as before)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(cls=ServeCli)
def cli():
    """Retrieval from an exported bundle, without torch: index a gallery, query it, serve it.

    \b
    fbnet-serve-cli index --bundle B --images DIR --captions FILE --out G
    fbnet-serve-cli query IMAGE... | --text "a caption" --bundle B --gallery G
    fbnet-serve-cli serve --bundle B --gallery G

    A first argument that is not a command runs `query`: `fbnet-serve-cli IMAGE --bundle B
    --gallery G` and `fbnet-serve-cli --text "..." --bundle B --gallery G` work as before.
    """
    warnings.filterwarnings("ignore", module="onnxruntime")


@cli.command("index")
@click.option("--bundle", required=True, type=click.Path(), help="bundle directory from `fbnet export`")
@click.option("--images", "image_dir", type=click.Path(), help="directory of gallery images")
@click.option("--captions", type=click.Path(), help="text file, one gallery caption per line")
@click.option("--out", required=True, type=click.Path(), help="gallery directory to write")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--float16", is_flag=True, help="store features as float16 (half the bytes; same as --store float16)")
@click.option("--store", type=click.Choice(STORES), help="how block features are stored: float32 (default), float16, "
              "or FAISS codes decoded per query (sq8, sq4, residual4, pq; see docs/scale.md)")
@click.option("--first-stage", type=click.Choice(["auto", "flat", "ivf", "hnsw"]), default="auto", show_default=True,
              help="first-stage index: auto = exact below 100,000 items, else FAISS IVF (built and saved here)")
@click.option("--shard-size", type=click.IntRange(min=1), help="write shards of this many images and captions "
              "(each committed on its own; an interrupted job resumes at the first missing shard)")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="index on Ray: a cluster's address (ray://host:10001, auto), or none for a local cluster; "
                   "writes shards (--shard-size, default 1000)")
@click.option("--ray-workers", default=2, show_default=True, help="with --ray: encoder actors")
@click.option("--ray-gpus-per-worker", default=0.0, show_default=True, help="with --ray: GPUs per actor")
@click.option("--first-stage-memory", type=int, help="MB for each side's first-stage vectors (IVF-PQ when "
                                                     "the full vectors do not fit)")
def index_cmd(bundle, image_dir, captions, out, backend, float16, store, first_stage, shard_size, ray_address,
              ray_workers, ray_gpus_per_worker, first_stage_memory):
    """Encode a gallery of images and captions once (resumable)."""
    if not image_dir and not captions:
        raise click.UsageError("give --images, --captions, or both")
    images = list_images(image_dir) if image_dir else []
    caps = read_captions(captions) if captions else []
    t0 = time.time()
    options = {"store": store or ("float16" if float16 else "float32"), "first_stage": first_stage,
               "memory_budget": first_stage_memory << 20 if first_stage_memory else None}
    if ray_address:
        # the driver only plans the shards and lists them when built: the workers open the backend,
        # so a head node without a GPU (or TensorRT) can drive GPU workers
        backend = "onnxruntime" if backend == "auto" and not ray_gpus_per_worker else backend

    def index_model(bundle_dir, target) -> str:
        """One model's gallery (an ensemble runs this for each member); returns what encoded it."""
        if ray_address:
            from .gallery.ray_index import index_on_ray

            index_on_ray(bundle_dir, images, caps, target, shard_size or 1000, workers=ray_workers,
                         address=None if ray_address == "local" else ray_address, backend=backend,
                         gpus_per_worker=ray_gpus_per_worker, log=click.echo, **options)
            return f"{ray_workers} Ray workers ({backend})"
        retriever = open_retriever(bundle_dir, backend)
        if shard_size:
            build_sharded(retriever, images, caps, target, shard_size, **options)
        else:
            build_gallery(retriever, images, caps, target, **options)
        return retriever.backend.name

    if is_ensemble_bundle(bundle):
        encoders: set[str] = set()
        build_ensemble_gallery(open_ensemble_bundle(bundle), out,
                               lambda member, folder: encoders.add(index_model(member.root, folder)))
        used = ", ".join(sorted(encoders)) or "members indexed before"
    else:
        used = index_model(bundle, out)
    click.echo(f"indexed {len(images)} images and {len(caps)} captions into {out} with {used} "
               f"in {time.time() - t0:.1f}s")


@cli.command("query")
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--text", "texts", multiple=True, help="a caption query (repeatable)")
@click.option("--bundle", required=True, type=click.Path())
@click.option("--gallery", required=True, type=click.Path())
@click.option("--top-k", default=5, show_default=True)
@click.option("--shortlist", default=DEFAULT_SHORTLIST, show_default=True,
              help="two-stage search: re-rank this many first-stage candidates (0 = exhaustive)")
@click.option("--exhaustive", is_flag=True, help="score every gallery item (same as --shortlist 0)")
@click.option("--nprobe", type=click.IntRange(min=1), help="IVF first stage: inverted lists to visit")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
def query_cmd(images, texts, bundle, gallery, top_k, shortlist, exhaustive, nprobe, as_json, backend):
    """Rank the gallery's captions for image queries, or its images for --text queries."""
    if not images and not texts:
        raise click.UsageError("give query images, or --text \"a caption\"")
    retriever = open_retriever(bundle, backend)
    g = open_gallery(gallery, retriever.bundle)
    # the queries' own errors (unreadable image, empty caption) come first
    image_queries = retriever.encode_images(list(images)) if images else None
    text_queries = retriever.encode_texts(list(texts)) if texts else None
    if images and g.text_features is None:
        raise GalleryError(f"{gallery}: has no captions to rank for an image query")
    if texts and g.image_features is None:
        raise GalleryError(f"{gallery}: has no images to rank for a text query")
    searcher = Searcher.for_gallery(retriever, g, 0 if exhaustive else shortlist)
    results = []
    if images:
        hits = searcher.texts_for(image_queries, top_k, nprobe=nprobe)
        results += [hits_json(q, "image", h, g.captions, "caption") for q, h in zip(images, hits)]
    if texts:
        hits = searcher.images_for(text_queries, top_k, nprobe=nprobe)
        results += [hits_json(q, "text", h, g.images, "image") for q, h in zip(texts, hits)]
    if as_json:
        click.echo(json.dumps({"backend": retriever.backend.name, "results": results}, indent=1))
        return
    for r in results:
        click.echo(f"{r['type']} query: {r['query']}")
        for hit in r["hits"]:
            click.echo(f"  {hit['rank']:2d}. {hit['score']:7.4f}  {hit[r['returns']]}")


RERANK_LANES = click.option(
    "--rerank-lanes", default=os.cpu_count() or 1, show_default="cores",
    help="re-rank a batch's queries in parallel on this many one-thread sessions (ONNX Runtime CPU)")


@cli.command("serve")
@click.option("--bundle", required=True, type=click.Path())
@click.option("--gallery", required=True, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (loopback by default)")
@click.option("--port", default=8080, show_default=True, help="port (0: any free port)")
@click.option("--shortlist", default=DEFAULT_SHORTLIST, show_default=True,
              help="default two-stage re-ranking depth (0 = exhaustive); a request may override it")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--max-batch", default=64, show_default=True, help="queries per inference call")
@click.option("--max-wait-ms", default=0.0, show_default=True,
              help="how long a batch waits for more queries (0: takes what is already queued)")
@click.option("--max-queue", default=256, show_default=True, help="queued queries before 503 + Retry-After")
@click.option("--max-pixels", default=MAX_PIXELS, show_default=True, help="declared image pixels before 413")
@click.option("--max-header-bytes", default=MAX_HEADER_BYTES, show_default=True,
              help="request line and headers before 431")
@RERANK_LANES
@click.option("--http", type=click.Choice(["auto", "httptools", "h11"]), default="auto", show_default=True,
              help="uvicorn's HTTP parser")
@click.option("--quiet", is_flag=True, help="do not log each request")
def serve_cmd(bundle, gallery, host, port, shortlist, backend, max_batch, max_wait_ms, max_queue, max_pixels,
              max_header_bytes, rerank_lanes, http, quiet):
    """Serve text and image queries over HTTP + JSON, with a search page at /."""
    import logging

    from .serving.server import SearchServer, ServeConfig, listen, run_server

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retriever = open_retriever(bundle, backend)
    g = open_gallery(gallery, retriever.bundle)  # a bad gallery fails here, before the port opens
    server = SearchServer(lambda: SearchService(retriever, g, shortlist, rerank_lanes),
                          ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                      max_pixels=max_pixels, max_header_bytes=max_header_bytes))
    sock = listen(host, port)
    h, p = sock.getsockname()[:2]
    click.echo(f"serving {len(g.images)} images and {len(g.captions)} captions on http://{h}:{p} with "
               f"{retriever.backend.name} (GET /ready says when loaded; SIGTERM or Ctrl-C stops)", err=True)
    run_server(server, sock, http)


@cli.command("triton")
@click.option("--bundle", required=True, type=click.Path())
@click.option("--gallery", required=True, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--http-port", default=8000, show_default=True)
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True)
@click.option("--shortlist", default=DEFAULT_SHORTLIST, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--max-batch", default=64, show_default=True, help="Triton dynamic batcher's max_batch_size")
@click.option("--max-wait-us", default=0, show_default=True, help="its max_queue_delay_microseconds")
@click.option("--max-pixels", default=MAX_PIXELS, show_default=True, help="declared image pixels before a 400")
@RERANK_LANES
@click.option("--log-file", type=click.Path(), help="Triton's own log (default: standard output)")
def triton_cmd(bundle, gallery, host, http_port, grpc_port, metrics_port, shortlist, backend, max_batch,
               max_wait_us, max_pixels, rerank_lanes, log_file):
    """Serve the search through Triton Inference Server (PyTriton's server; see `triton-env`)."""
    import signal
    import threading

    from .serving.triton import serve_triton

    retriever = open_retriever(bundle, backend)  # a bad bundle, gallery or backend fails here, in one line
    open_gallery(gallery, retriever.bundle)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    triton = serve_triton(bundle, gallery, host, http_port, grpc_port, metrics_port, shortlist, backend, max_batch,
                          max_wait_us, rerank_lanes, log_file, max_pixels)
    click.echo(f"Triton serving fbnet_search_text and fbnet_search_image on http://{host}:{http_port} "
               f"(gRPC {grpc_port}, metrics {metrics_port}) with {retriever.backend.name}; ready "
               "(GET /v2/health/ready); SIGTERM or Ctrl-C stops", err=True)
    try:
        stop.wait()
    finally:
        triton.stop()


@cli.command("triton-env")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
def triton_env_cmd(directory):
    """Build (or reuse) the PyTriton environment (numpy < 2) and print its python."""
    from pathlib import Path

    from .serving.triton_env import build

    click.echo(build(Path(directory) if directory else None, log=lambda m: click.echo(m, err=True)))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    try:
        return cli.main(list(sys.argv[1:] if argv is None else argv), prog_name="fbnet-serve-cli",
                        standalone_mode=False) or 0
    except click.ClickException as exc:  # FbnetGroup turns every FbnetError into one
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130


def console() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    console()
