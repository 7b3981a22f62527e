"""``fbnet-serve-cli``: retrieval from an exported bundle, without torch.

::

    fbnet-serve-cli index --bundle B --images DIR --captions FILE --out GALLERY
    fbnet-serve-cli query.jpg [more.jpg ...] --bundle B --gallery G [--top-k 5] [--json]
    fbnet-serve-cli --text "a dog runs on grass" [--text ...] --bundle B --gallery G

Several queries in one call are encoded and scored as one batch.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import click
import numpy as np

from fbnet.preprocess import ImageError

from .backends import BACKENDS, BackendUnavailable, select_backend
from .bundle import BundleError, open_bundle
from .gallery import Gallery, GalleryError, build_gallery, list_images, read_captions
from .retriever import QueryError, Retriever

ERRORS = (BundleError, GalleryError, QueryError, ImageError, BackendUnavailable)


def _retriever(bundle: str, backend: str) -> Retriever:
    b = open_bundle(bundle)
    return Retriever(b, select_backend(b, backend))


@click.command("index")
@click.option("--bundle", required=True, type=click.Path(), help="bundle directory from `fbnet export`")
@click.option("--images", "image_dir", type=click.Path(), help="directory of gallery images")
@click.option("--captions", type=click.Path(), help="text file, one gallery caption per line")
@click.option("--out", required=True, type=click.Path(), help="gallery directory to write")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--float16", is_flag=True, help="store features as float16 (half the bytes)")
def index_cmd(bundle, image_dir, captions, out, backend, float16):
    """Encode a gallery of images and captions once (resumable)."""
    if not image_dir and not captions:
        raise click.UsageError("give --images, --captions, or both")
    retriever = _retriever(bundle, backend)
    images = list_images(image_dir) if image_dir else []
    caps = read_captions(captions) if captions else []
    t0 = time.time()
    build_gallery(retriever, images, caps, out, dtype="float16" if float16 else "float32")
    click.echo(f"indexed {len(images)} images and {len(caps)} captions into {out} with "
               f"{retriever.backend.name} in {time.time() - t0:.1f}s")


@click.command("query")
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--text", "texts", multiple=True, help="a caption query (repeatable)")
@click.option("--bundle", required=True, type=click.Path())
@click.option("--gallery", required=True, type=click.Path())
@click.option("--top-k", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
def query_cmd(images, texts, bundle, gallery, top_k, as_json, backend):
    """Rank the gallery's captions for image queries, or its images for --text queries."""
    if not images and not texts:
        raise click.UsageError("give query images, or --text \"a caption\"")
    retriever = _retriever(bundle, backend)
    g = Gallery(gallery, retriever.bundle)
    image_queries = retriever.encode_images(list(images)) if images else None
    text_queries = retriever.encode_texts(list(texts)) if texts else None
    results = []
    if image_queries is not None:
        if g.text_features is None:
            raise GalleryError(f"{gallery}: has no captions to rank for an image query")
        scores = retriever.score(image_queries, g.text_features)
        results += _rank(images, "image", scores, g.captions, "caption", top_k)
    if text_queries is not None:
        if g.image_features is None:
            raise GalleryError(f"{gallery}: has no images to rank for a text query")
        scores = retriever.score(g.image_features, text_queries).T
        results += _rank(texts, "text", scores, g.images, "image", top_k)
    if as_json:
        click.echo(json.dumps({"backend": retriever.backend.name, "results": results}, indent=1))
        return
    for r in results:
        click.echo(f"{r['type']} query: {r['query']}")
        for hit in r["hits"]:
            click.echo(f"  {hit['rank']:2d}. {hit['score']:7.4f}  {hit[r['returns']]}")


def _rank(queries, qtype, scores, gallery_items, returns, k):
    out = []
    for q, row in zip(queries, scores):
        top = np.argsort(-row, kind="stable")[:k]
        out.append({"query": str(q), "type": qtype, "returns": returns,
                    "hits": [{"rank": r + 1, "score": float(row[i]), "index": int(i), returns: gallery_items[i]}
                             for r, i in enumerate(top)]})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = index_cmd if argv[:1] == ["index"] else query_cmd
    args = argv[1:] if argv[:1] == ["index"] else argv
    warnings.filterwarnings("ignore", module="onnxruntime")
    try:
        return command.main(args, prog_name="fbnet-serve-cli" + (" index" if command is index_cmd else ""),
                            standalone_mode=False) or 0
    except ERRORS as exc:
        click.secho(f"Error: {exc}", fg="red", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130


def console() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    console()
