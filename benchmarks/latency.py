"""Per-stage and end-to-end query latency: PyTorch eager vs ONNX Runtime, measured in one run.

    python benchmarks/latency.py --checkpoint runs/synth-seed0/best.pt

exports the bundle beside the checkpoint when it is missing, builds a gallery of 1,000 captions
and 1,000 images from the checkpoint's dataset, times each stage (detector, image encoder, text
encoder, scorer) and a whole image query (decode -> top-k captions) and text query (-> top-k
images) on both backends, and writes the table into BENCHMARKS.md (section "Query latency").
PyTorch runs the very modules that were exported (``fbnet.export.graphs``), so the comparison is
like for like. Medians and p95 over ``--repeats`` runs after ``--warmup`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fbnet.checkpoint import load_checkpoint
from fbnet.data.manifest import load_dataset
from fbnet.evaluate import load_model
from fbnet.export.bundle import export_bundle
from fbnet.export.graphs import DetectorGraph, ImageEncoderGraph, ScorerGraph, TextEncoderGraph
from fbnet.pipeline import frozen_from_checkpoint
from fbnet.preprocess import load_image
from fbnet.runtime.engine.backends import OnnxRuntimeBackend
from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.engine.retriever import Retriever
from fbnet.windows import image_block_boxes

from common import ROOT, machine, timeit, write_section

class TorchPipeline:
    """The exported modules, run eagerly in PyTorch."""

    def __init__(self, ckpt):
        cfg, model, self.vocab, fusion = load_model(ckpt)
        self.cfg = cfg
        det, enc = frozen_from_checkpoint(cfg, ckpt)
        self.detector = DetectorGraph(det).eval() if det is not None else None
        self.image = ImageEncoderGraph(enc, model).eval()
        self.text = TextEncoderGraph(model).eval()
        self.scorer = ScorerGraph(model, fusion).eval()
        self.size = cfg.model.backbone.image_size

    @torch.no_grad()
    def detect(self, canvas):
        if self.detector is None:
            return np.zeros((0, 4)), np.zeros((0,))
        b, s = self.detector(canvas[None])
        return b[0].numpy(), s[0].numpy()

    @torch.no_grad()
    def encode_canvas(self, canvas: torch.Tensor):
        boxes, mask = image_block_boxes(self.size, *self.detect(canvas), self.cfg.model.levels,
                                        self.cfg.model.detector.max_boxes)
        fg = torch.from_numpy(mask[None].astype(np.float32))
        return self.image(canvas[None], torch.from_numpy(boxes[None]), fg), fg

    @torch.no_grad()
    def encode_texts(self, captions):
        ids, lengths = self.vocab.encode_batch(captions, self.cfg.data.max_words)
        return self.text(torch.from_numpy(ids), torch.from_numpy(lengths))

    @torch.no_grad()
    def score(self, blocks, fg, windows):
        return self.scorer(fg, *blocks, *windows)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "synth-seed0" / "best.pt")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--gallery", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if not args.checkpoint.is_file():
        sys.exit(f"{args.checkpoint}: no checkpoint; run `fbnet train` first (see README)")
    bundle_dir = args.bundle or args.checkpoint.parent / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        export_bundle(args.checkpoint, bundle_dir)
    ckpt = load_checkpoint(args.checkpoint)
    pt = TorchPipeline(ckpt)
    bundle = open_bundle(bundle_dir)
    ort_r = Retriever(bundle, OnnxRuntimeBackend(bundle))

    ds = load_dataset(ckpt["data_root"])
    items = ds.split("test") + ds.split("val") + ds.split("train")
    captions = [c for it in items for c in it.captions][: args.gallery]
    image_paths = [it.image for it in items][: args.gallery]
    query_image, query_text = ds.split("test")[0].image, ds.split("test")[0].captions[0]
    print(f"gallery: {len(captions)} captions, {len(image_paths)} images from {ckpt['data_root']}")

    # galleries, encoded once per backend
    ort_caps = ort_r.encode_texts(captions)
    ort_imgs = ort_r.encode_images(image_paths)
    pt_caps = pt.encode_texts(captions)
    pt_img_parts = [pt.encode_canvas(torch.from_numpy(load_image(p, pt.size))) for p in image_paths]
    pt_imgs = tuple(torch.cat([p[0][k] for p in pt_img_parts]) for k in range(len(pt_caps)))
    pt_fg = torch.cat([p[1] for p in pt_img_parts])

    canvas = load_image(query_image, pt.size)
    tcanvas = torch.from_numpy(canvas)
    one_img_ort = ort_r.encode_canvases(canvas[None])
    one_txt_ort = ort_r.encode_texts([query_text])
    one_img_pt = pt.encode_canvas(tcanvas)
    one_txt_pt = pt.encode_texts([query_text])
    r, w = args.repeats, args.warmup
    pt_boxes = _boxes(pt, tcanvas)  # window boxes from detection, computed once: stage timings exclude it
    ort_feeds = _ort_feeds(ort_r, canvas)

    def pt_image_query():
        c = torch.from_numpy(load_image(query_image, pt.size))
        blocks, fg = pt.encode_canvas(c)
        return torch.topk(pt.score(blocks, fg, pt_caps)[0], 5)

    def pt_text_query():
        return torch.topk(pt.score(pt_imgs, pt_fg, pt.encode_texts([query_text]))[:, 0], 5)

    def ort_image_query():
        feats = ort_r.encode_images([query_image])
        return np.argsort(-ort_r.score(feats, ort_caps)[0])[:5]

    def ort_text_query():
        return np.argsort(-ort_r.score(ort_imgs, ort_r.encode_texts([query_text]))[:, 0])[:5]

    rows = [
        ("detector (1 image)", timeit(lambda: pt.detect(tcanvas), r, w), timeit(lambda: ort_r.detect(canvas), r, w)),
        ("image encoder (1 image, after detection)",
         timeit(lambda: pt.image(tcanvas[None], *pt_boxes), r, w),
         timeit(lambda: ort_r.backend.run("image_encoder", ort_feeds), r, w)),
        ("text encoder (1 caption)", timeit(lambda: pt.encode_texts([query_text]), r, w),
         timeit(lambda: ort_r.encode_texts([query_text]), r, w)),
        (f"scorer: 1 image x {len(captions)} captions",
         timeit(lambda: pt.score(one_img_pt[0], one_img_pt[1], pt_caps), r, w),
         timeit(lambda: ort_r.score(one_img_ort, ort_caps), r, w)),
        (f"scorer: {len(image_paths)} images x 1 caption",
         timeit(lambda: pt.score(pt_imgs, pt_fg, one_txt_pt), r, w),
         timeit(lambda: ort_r.score(ort_imgs, one_txt_ort), r, w)),
        (f"end to end: image query -> top 5 of {len(captions)} captions",
         timeit(pt_image_query, r, w), timeit(ort_image_query, r, w)),
        (f"end to end: text query -> top 5 of {len(image_paths)} images",
         timeit(pt_text_query, r, w), timeit(ort_text_query, r, w)),
    ]
    table = ["| stage | PyTorch eager median (ms) | p95 | ONNX Runtime CPU median (ms) | p95 | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, a, b in rows:
        table.append(f"| {name} | {a['median']:.2f} | {a['p95']:.2f} | {b['median']:.2f} | {b['p95']:.2f} | "
                     f"{a['median'] / b['median']:.2f}x |")
    e2e_img = rows[5][2]["median"]
    scorer_share = rows[3][2]["median"] / e2e_img
    summary = (f"In this run ONNX Runtime is {rows[0][1]['median'] / rows[0][2]['median']:.1f}x faster than PyTorch "
               f"on the detector and {rows[2][1]['median'] / rows[2][2]['median']:.1f}x on the text encoder; the "
               f"cross-attention scorer dominates a query ({100 * scorer_share:.0f}% of the ONNX Runtime image "
               f"query) and decides the end-to-end ratio.")
    section = "\n".join([
        "## Query latency (issue: export and runtime)",
        "",
        f"Machine: {machine()}. No GPU on this machine, so no CUDA or TensorRT figures.",
        f"Model: `{_rel(args.checkpoint)}` (embedded synthetic default), bundle `{_rel(bundle_dir)}`. "
        f"{r} timed runs after {w} warm-up runs, one process, both backends in the same run.",
        "Regenerate: `python benchmarks/latency.py --checkpoint runs/synth-seed0/best.pt`.",
        "",
        *table,
        "",
        summary,
        "",
    ])
    print(section)
    write_section(args.out, "## Query latency", section)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _boxes(pt, tcanvas):
    boxes, mask = image_block_boxes(pt.size, *pt.detect(tcanvas), pt.cfg.model.levels, pt.cfg.model.detector.max_boxes)
    return torch.from_numpy(boxes[None]), torch.from_numpy(mask[None].astype(np.float32))


def _ort_feeds(r, canvas):
    boxes, mask = image_block_boxes(canvas.shape[-1], *r.detect(canvas), r.levels, r.max_boxes)
    return {"image": canvas[None], "block_boxes": boxes[None], "fg_mask": mask[None].astype(np.float32)}


if __name__ == "__main__":
    main()
