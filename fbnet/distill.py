"""Distilling a teacher detector's boxes into :class:`~fbnet.models.mobilenet_head.MobileNetHeadDetector`
(``fbnet distill-detector``).

The teacher is the config's detector (the recipe's YOLOv3-tiny at 416). For every training and
dev image the teacher's kept boxes and scores (at most J, score >= its threshold) and the student's
two frozen MobileNetV2 maps are computed once (:func:`teacher_targets`, cached beside the output
so that an interrupted job resumes without the teacher pass). Only the two heads train, on those
cached maps:

* assignment (YOLOv3's): each teacher box goes to the anchor of best shape IoU among all six, on
  that anchor's map, in the cell holding the box centre;
* objectness: binary cross-entropy against the teacher's *score* at assigned anchors (soft
  targets: the distillation) and 0 elsewhere, except that unassigned predictions whose box
  already overlaps a teacher box at IoU > 0.5 are ignored (YOLOv3's ignore rule);
* box: binary cross-entropy of ``sigmoid(tx), sigmoid(ty)`` against the centre's offset in its
  cell, squared error of ``tw, th`` against ``log(w / anchor_w)``, weighted ``2 - w h / S^2``
  (YOLOv3's small-box weight).

Anchors are set first by k-means of the training boxes' sizes under shape IoU (YOLOv2's), sorted
by area, three per map. After each epoch the student detects on the dev images and is compared
with the teacher (:func:`agreement`): recall, the share of teacher boxes some student box overlaps
at IoU >= 0.5, and precision, the share of student boxes that overlap a teacher box so; the epoch
with the best F1 of the two is kept. Selection reads the dev split only.

The loss and assignment are a reconstruction of YOLOv3's (Redmon and Farhadi 2018), not its code.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou
from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text
from .config import ConfigError, FBNetConfig
from .data.manifest import Dataset, Item
from .features import cache_key, state_digest
from .models.detector import Detector, build_detector, detect
from .models.mobilenet_head import KIND, STRIDES, MobileNetHeadDetector
from .preprocess import load_image

#: a teacher box must overlap a student box at least this much to count as found
AGREEMENT_IOU = 0.5
#: unassigned predictions overlapping a teacher box above this are not pushed to objectness 0
IGNORE_IOU = 0.5


@dataclass
class Targets:
    """Per image: the student's frozen maps (float16) and the teacher's boxes ``(N, J, 4)`` in canvas
    pixels and scores ``(N, J)`` (0 where the teacher kept fewer than J boxes)."""

    maps: list[np.ndarray]
    boxes: np.ndarray
    scores: np.ndarray

    def batch(self, rows: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return ([torch.from_numpy(m[rows].astype(np.float32)) for m in self.maps],
                torch.from_numpy(self.boxes[rows]), torch.from_numpy(self.scores[rows]))

    def save(self, path: Path, key: str) -> None:
        arrays = {f"map{i}": m for i, m in enumerate(self.maps)}
        atomic_write(path, lambda fh: np.savez(fh, key=np.array(key), boxes=self.boxes, scores=self.scores, **arrays))

    @classmethod
    def load(cls, path: Path, key: str) -> Targets | None:
        """The targets cached at ``path`` when they were made with ``key``, else None."""
        if not path.is_file():
            return None
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            return cls([z[f"map{i}"] for i in range(len(STRIDES))], z["boxes"], z["scores"])


@torch.no_grad()
def teacher_targets(items: list[Item], teacher: Detector, student: MobileNetHeadDetector, image_size: int,
                    batch_size: int = 32, desc: str = "teacher") -> Targets:
    """The teacher's boxes and the student's frozen maps for ``items`` (one pass each)."""
    maps, boxes, scores = [[] for _ in STRIDES], [], []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        batch = items[start: start + batch_size]
        canvases = torch.from_numpy(np.stack([load_image(it.image, image_size) for it in batch]))
        b, s = detect(teacher, canvases)
        boxes.append(b.numpy().astype(np.float32))
        scores.append(s.numpy().astype(np.float32))
        for i, m in enumerate(student.maps(canvases)):
            maps[i].append(m.numpy().astype(np.float16))
    return Targets([np.concatenate(m) for m in maps], np.concatenate(boxes), np.concatenate(scores))


def kmeans_anchors(boxes: np.ndarray, k: int, iters: int = 30, seed: int = 0) -> np.ndarray:
    """``k`` anchor sizes ``(k, 2)`` for boxes' ``(w, h)`` by k-means under shape IoU (YOLOv2),
    sorted by area; each centre is its cluster's median."""
    wh = np.asarray(boxes[:, 2:] - boxes[:, :2], dtype=np.float64)
    rng = np.random.default_rng(seed)
    centres = wh[rng.choice(len(wh), k, replace=False)]
    for _ in range(iters):
        inter = np.minimum(wh[:, None], centres[None]).prod(axis=2)
        shape_iou = inter / (wh.prod(axis=1)[:, None] + centres.prod(axis=1)[None] - inter)
        nearest = shape_iou.argmax(axis=1)
        centres = np.stack([np.median(wh[nearest == c], axis=0) if (nearest == c).any() else centres[c]
                            for c in range(k)])
    return centres[np.argsort(centres.prod(axis=1))].astype(np.float32)


def head_loss(student: MobileNetHeadDetector, preds: list[torch.Tensor], boxes: torch.Tensor,
              scores: torch.Tensor, canvas: int) -> torch.Tensor:
    """The distillation loss of the module doc for raw predictions ``preds`` (per map ``(N, A, H, W,
    5)``) against teacher ``boxes (N, J, 4)`` and ``scores (N, J)``, summed and divided by N."""
    n = boxes.shape[0]
    valid = scores > 0
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-3)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    anchors = student.anchors.reshape(-1, 2)
    inter = torch.minimum(wh[..., None, :], anchors).prod(-1)
    best = (inter / (wh.prod(-1)[..., None] + anchors.prod(-1) - inter)).argmax(-1)  # (N, J) over all anchors
    per_map = student.anchors.shape[1]
    decoded, _ = student.decode([p.detach() for p in preds])
    overlap = torch.stack([box_iou(d, b[v]).max(dim=1).values if v.any() else torch.zeros(len(d))
                           for d, b, v in zip(decoded, boxes, valid)])  # (N, P)
    total, offset = preds[0].new_zeros(()), 0
    for m, (p, stride) in enumerate(zip(preds, STRIDES)):
        _, a, h, w, _ = p.shape
        target = torch.zeros(p.shape[:4])
        weight = (overlap[:, offset: offset + a * h * w].view(n, a, h, w) <= IGNORE_IOU).float()
        offset += a * h * w
        img, j = torch.nonzero(valid & (best // per_map == m), as_tuple=True)
        if len(img):
            anchor = best[img, j] % per_map
            cell = centre[img, j] / stride
            gx, gy = cell[:, 0].long().clamp(0, w - 1), cell[:, 1].long().clamp(0, h - 1)
            target[img, anchor, gy, gx] = scores[img, j]
            weight[img, anchor, gy, gx] = 1.0
            q = p[img, anchor, gy, gx]  # (P+, 5)
            scale = 2 - wh[img, j].prod(-1) / canvas ** 2
            xy = F.binary_cross_entropy_with_logits(q[:, :2], (cell - torch.stack([gx, gy], 1)).clamp(0, 1),
                                                    reduction="none").sum(-1)
            log_wh = torch.log(wh[img, j] / student.anchors[m][anchor])
            total = total + (scale * (xy + 0.5 * ((q[:, 2:4] - log_wh) ** 2).sum(-1))).sum()
        total = total + (F.binary_cross_entropy_with_logits(p[..., 4], target, reduction="none") * weight).sum()
    return total / n


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a (n, 4)`` with every box of ``b (m, 4)``, x1 y1 x2 y2."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """The share of the ``reference`` boxes (one ``(n, 4)`` array per image) that some box of
    ``other`` overlaps at IoU >= 0.5."""
    hits = [(iou(r, o).max(axis=1) >= AGREEMENT_IOU).sum() if len(o) and len(r) else 0
            for r, o in zip(reference, other)]
    return float(sum(hits) / max(1, sum(len(r) for r in reference)))


@torch.no_grad()
def dev_agreement(student: MobileNetHeadDetector, dev: Targets, canvas: int, batch_size: int = 64) -> dict:
    """The student's boxes (its top J) on the dev maps against the teacher's: recall, precision,
    their F1 and boxes per photo."""
    student.eval()
    found = []
    for start in range(0, len(dev.boxes), batch_size):
        maps, _, _ = dev.batch(np.arange(start, min(start + batch_size, len(dev.boxes))))
        found += [b[: student.max_boxes].numpy() for b, _ in student.kept(maps, canvas)]
    teacher = [b[s > 0] for b, s in zip(dev.boxes, dev.scores)]
    recall, precision = agreement(teacher, found), agreement(found, teacher)
    f1 = 2 * recall * precision / max(recall + precision, 1e-9)
    return {"recall": recall, "precision": precision, "f1": f1, "boxes": float(np.mean([len(f) for f in found]))}


def distill_detector(cfg: FBNetConfig, dataset: Dataset, out: str | Path, epochs: int = 30, batch_size: int = 64,
                     lr: float = 1e-3, echo=print) -> dict:
    """Train a :class:`MobileNetHeadDetector` on the config's detector's boxes (the module doc) and
    write it to ``out`` atomically; returns what the file records under ``distillation``."""
    m, out = cfg.model, Path(out)
    if m.detector.name in ("none", "mobilenet_v2_head"):
        raise ConfigError(f"model.detector is {m.detector.name!r}: distill-detector needs a teacher detector "
                          "there (e.g. yolov3_tiny)")
    if m.backbone.name != "mobilenet_v2":
        raise ConfigError(f"model.backbone is {m.backbone.name!r}: the head runs on MobileNetV2, whose weights "
                          "distill-detector reads from model.backbone.weights")
    size, seed = m.backbone.image_size, cfg.train.seed
    teacher = build_detector(m.detector, 0, size)
    torch.manual_seed(seed)
    student = MobileNetHeadDetector(m.detector.max_boxes, m.detector.score_threshold,
                                    trunk_weights=m.backbone.weights).eval()
    key = {"teacher": m.detector.model_dump(), "teacher_state": state_digest(teacher.state_dict()),
           "student": state_digest(student.stages.state_dict()), "canvas": size}
    data = {}
    for split in ("train", "val"):
        items = dataset.split(split)
        cache, split_key = out.parent / f"{out.stem}-targets-{split}.npz", cache_key(items, key)
        data[split] = Targets.load(cache, split_key)
        if data[split] is None:
            data[split] = teacher_targets(items, teacher, student, size, desc=f"teacher[{split}]")
            data[split].save(cache, split_key)
    train, dev = data["train"], data["val"]
    teacher_boxes, n_anchors = train.boxes[train.scores > 0], student.anchors[..., 0].numel()
    if len(teacher_boxes) < n_anchors:
        raise ConfigError(f"model.detector {m.detector.name!r} kept {len(teacher_boxes)} boxes on the "
                          f"{len(train.boxes)} training images of {dataset.root}: too few to teach a detector "
                          f"(threshold {m.detector.score_threshold})")
    anchors = kmeans_anchors(teacher_boxes, n_anchors, seed=seed)
    student.anchors.copy_(torch.from_numpy(anchors).view_as(student.anchors))
    opt = torch.optim.AdamW(student.heads.parameters(), lr, weight_decay=1e-4)
    steps = epochs * -(-len(train.boxes) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    best, state = None, None
    for epoch in range(1, epochs + 1):
        t0, losses = time.time(), []
        student.train()
        order = rng.permutation(len(train.boxes))
        for start in tqdm(range(0, len(order), batch_size), desc=f"distill {epoch}", unit="batch", leave=False):
            maps, boxes, scores = train.batch(np.sort(order[start: start + batch_size]))
            loss = head_loss(student, student.predict(maps), boxes, scores, size)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        on_dev = dev_agreement(student, dev, size)
        better = best is None or on_dev["f1"] > best["f1"]
        echo(f"epoch {epoch}: loss {np.mean(losses):.3f}  dev recall {on_dev['recall']:.3f}  precision "
             f"{on_dev['precision']:.3f}  F1 {on_dev['f1']:.3f}  boxes/photo {on_dev['boxes']:.2f}"
             f"{'  (best)' if better else ''}  [{time.time() - t0:.0f}s]")
        if better:
            best, state = {**on_dev, "epoch": epoch}, copy.deepcopy(student.state_dict())
    info = {"teacher": m.detector.model_dump(), "epochs": epochs, "best": best,
            "teacher_boxes_per_photo": float((dev.scores > 0).sum(axis=1).mean()),
            "train_images": len(train.boxes), "dev_images": len(dev.boxes)}
    student.load_state_dict(state)
    save_distilled(out, student, size, info)
    atomic_write_text(out.parent / f"{out.stem}.json", json.dumps(info, indent=2) + "\n")
    return info


def save_distilled(path: str | Path, student: MobileNetHeadDetector, canvas: int, info: dict) -> Path:
    """Write ``student`` atomically in the form :func:`~fbnet.models.mobilenet_head.read_distilled`
    reads: its state, the ``model.detector`` keys it serves, its ``canvas`` and ``info``."""
    payload = {"kind": KIND, "state_dict": student.state_dict(), "canvas": canvas, "distillation": info,
               "detector": {"name": "mobilenet_v2_head", "max_boxes": student.max_boxes,
                            "score_threshold": student.score_threshold}}
    return atomic_write(path, lambda fh: torch.save(payload, fh))
