"""`fbnet evaluate`: MAP, Recall@K and R@sum of a checkpoint on a split, with PR curves drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_write, atomic_write_text
from .checkpoint import load_checkpoint
from .config import FBNetConfig
from .data.manifest import load_dataset
from .ensemble import combine, is_ensemble, load_ensemble, member_checkpoints
from .metrics import PR_LEVELS, RECALL_KS, chance_map, retrieval_report
from .models.fbnet import BRANCH_KEY, Fusion
from .models.registry import build_model
from .pipeline import Captions, feature_cache, frozen_from_checkpoint, score_split, split_features
from .vocab import Vocabulary


def load_model(ckpt: dict):
    """``(config, model, vocabulary, fusion weights)`` of a checkpoint (any registered model)."""
    cfg = FBNetConfig.from_dict(ckpt["config"], "checkpoint config")
    vocab = Vocabulary.from_json(ckpt["vocab"])
    model = build_model(cfg.model, len(vocab), ckpt["feature_dim"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return cfg, model, vocab, Fusion(**ckpt["fusion"])


def member_scores(ckpt_path: str | Path, split: str, data: str | None = None, sims: dict | None = None):
    """One checkpoint on ``split``: ``(fused scores, per-key matrices, captions, report context)``.
    ``sims`` (per-key matrices the caller already has for this split) skips scoring."""
    ckpt = load_checkpoint(ckpt_path)
    cfg, model, vocab, fusion = load_model(ckpt)
    dataset = load_dataset(data or ckpt["data_root"])
    items = dataset.split(split)
    caps = Captions.from_items(items, vocab, cfg.data.max_words, dataset.has_labels)
    if sims is None:
        detector, encoder = frozen_from_checkpoint(cfg, ckpt)
        feats = split_features(cfg, items, detector, encoder, feature_cache(cfg, Path(ckpt_path).parent), split)
        sims = score_split(model, feats, caps, cfg.train.eval_chunk)
    return model.fuse(sims, fusion), sims, caps, {"fusion": vars(fusion), "model": cfg.model.name}


def evaluate(source: str | Path, split: str = "test", data: str | None = None,
             out: str | Path | None = None, sims: dict | None = None) -> dict:
    """Score ``split`` with a checkpoint, or an ensemble file (:mod:`fbnet.ensemble`), and write
    ``metrics-<split>.json``, a PR-curve PNG and ``scores-<split>.npz`` (the fused matrix, images x
    captions, and the per-key matrices of a checkpoint or the members' fused ones of an ensemble).
    ``sims`` (a checkpoint's per-key matrices for this split, already computed) skips scoring."""
    source = Path(source)
    if is_ensemble(source):
        ensemble = load_ensemble(source)
        data = data or member_checkpoints(ensemble)[0]["data_root"]
        parts = [member_scores(m.checkpoint, split, data) for m in ensemble.members]
        fused = combine([p[0] for p in parts], [m.weight for m in ensemble.members])
        caps, context = parts[0][2], {"model": "ensemble", "members": [
            {"checkpoint": str(m.checkpoint), "weight": m.weight, **p[3]} for m, p in zip(ensemble.members, parts)]}
        matrices = {f"member{i}": p[0] for i, p in enumerate(parts)}
    else:
        fused, sims, caps, context = member_scores(source, split, data, sims)
        matrices = {f"{BRANCH_KEY[b]}{u}": s for (b, u), s in sims.items()}
    report = retrieval_report(fused, caps.image, caps.image_labels, caps.labels)
    report["split"], report["checkpoint"] = split, str(source)
    report["chance_map"] = chance_map(caps.image, caps.image_labels, caps.labels)
    report.update(context)
    out = Path(out) if out else source.parent
    atomic_write_text(out / f"metrics-{split}.json", json.dumps(report, indent=1))
    atomic_write(out / f"scores-{split}.npz", lambda fh: np.savez(fh, fused=fused, caption_image=caps.image, **matrices))
    plot_pr(report, out / f"pr-{split}.png")
    return report


def format_report(report: dict) -> str:
    lines = [f"split {report.get('split', '?')}: {report['images']} images, {report['captions']} captions"]
    for kind in ("category", "instance"):
        if kind not in report:
            continue
        r = report[kind]
        lines.append(f"  {kind:9s} MAP  i2t {r['i2t']['map']:.4f}  t2i {r['t2i']['map']:.4f}  "
                     f"mean {r['map']:.4f}")
        for d in ("i2t", "t2i"):
            lines.append(f"  {kind:9s} {d}  " + "  ".join(f"R@{k} {r[d][f'r@{k}']:5.1f}" for k in RECALL_KS))
        lines.append(f"  {kind:9s} R@sum {r['rsum']:.1f}")
    if "chance_map" in report:
        lines.append(f"  chance MAP ({report['primary']}): {report['chance_map']:.4f}")
    return "\n".join(lines)


def plot_pr(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for kind in ("category", "instance"):
        for d, style in (("i2t", "-"), ("t2i", "--")):
            if kind in report:
                ax.plot(PR_LEVELS, report[kind][d]["pr"], style, marker=".",
                        label=f"{kind} {d} (MAP {report[kind][d]['map']:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{report.get('model', 'fbnet')} precision-recall ({report.get('split', '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
    return path
