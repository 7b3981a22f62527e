"""Training, after the paper's Algorithm 1.

1. Fine-tune the detector on the dataset's boxes (when it has boxes and no weights were given).
2. Extract and cache the frozen block features of every split.
3. Epochs over random mini-batches of (image, caption) pairs: the loss (DSAW or triplet) of
   every (branch, level) similarity matrix, summed; validation MAP after each epoch; the best
   epoch kept (``best.pt``), the latest one too (``last.pt``, for ``--resume``); the learning
   rate scaled by ``train.plateau_decay`` after an epoch without a better validation MAP, and
   early stopping after ``train.patience`` such epochs in a row. With ``train.ema_decay`` a
   moving average of the weights (:mod:`fbnet.ema`) is what each epoch validates and keeps.
4. Choose the fusion weights of eq. (7) on the validation split from the grid and store them in
   ``best.pt`` (the CLI then evaluates the test split, or the validation split when the dataset
   has no test split, as the shared Flickr8k has none).

Everything a run writes goes under ``out``: ``detector.pt``, ``features/``, ``last.pt``,
``best.pt``, ``log.jsonl`` (and ``curves.png``, drawn from it after every epoch; with
``train.tensorboard``, ``tensorboard/``), ``metrics-<split>.json``, ``pr-<split>.png``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .curves import TensorBoard, plot_curves
from .config import ConfigError, FBNetConfig
from .data.embeddings import WordVectorError, load_word_vectors
from .data.manifest import Dataset, DatasetError
from .ema import WeightAverage
from .losses import epoch_loss, pair_loss
from .metrics import retrieval_report
from .models.detector import finetune
from .models.fbnet import GLOBAL, Fusion
from .models.registry import build_model
from .distributed import Group, destroy, from_env, gather, process_device
from .features import SplitFeatures
from .pipeline import Captions, build_frozen, feature_cache, score_split, split_activations_for, split_features
from .preprocess import load_image
from .vocab import Vocabulary


def log_event(out: Path, **event) -> None:
    with (out / "log.jsonl").open("a") as fh:
        fh.write(json.dumps({"time": time.time(), **event}) + "\n")


def train(cfg: FBNetConfig, dataset: Dataset, out: str | Path, resume: bool = False,
          echo=print, choose_weights: bool = True) -> tuple[Path, dict | None]:
    """Train on ``dataset`` into ``out``; return the path of ``best.pt`` and the best model's
    per-(branch, level) validation similarity matrices (so reporting on validation rescores nothing).
    ``choose_weights=False`` stops after the epochs (no fusion search over the whole validation
    split; ``best.pt`` keeps equal weights and no matrices are returned), for quick comparisons."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = training_device(cfg.train.device)
    group = from_env(device)  # torchrun's processes (None: one process)
    device = process_device(device, group)  # before any collective: NCCL's are bound to the GPU set here
    main_rank = group is None or group.main
    if not main_rank:  # rank 0 speaks and writes for the group
        echo = lambda *a, **k: None  # noqa: E731
    last = out / "last.pt"
    state = None
    if resume:
        if not last.is_file():
            raise CheckpointError(f"{last}: nothing to resume (no last.pt in {out})")
        state = load_checkpoint(last)
        epochs = cfg.train.epochs  # the one setting a resumed run may change: train for longer
        cfg = FBNetConfig.from_dict(state["config"], f"{last} (config)")
        cfg.train.epochs = epochs
        echo(f"resuming {out} after epoch {state['epoch']} of {epochs}")
    elif last.exists():
        raise CheckpointError(f"{out} already holds a run (last.pt); pass --resume or another --out")
    if main_rank:
        log_event(out, event="resume" if resume else "start", config=cfg.to_dict(), dataset=str(dataset.root),
                  processes=group.world if group else 1)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)

    # 1-2. frozen stages and cached features (or, when the backbone's top is fine-tuned, cached
    # activations of its frozen part: training and validation then run the top in every step)
    n_box_classes = len(dataset.box_classes or [])
    if not main_rank:
        group.barrier()  # rank 0 fine-tunes the detector (when it must) and saves it; the rest load it
    detector, encoder = _frozen_stages(cfg, dataset, out, n_box_classes, echo)
    if group is not None and main_rank:
        group.barrier()
    finetune_top = cfg.model.backbone.trainable_blocks > 0
    splits = [s for s in dataset.splits if s in (("train", "val") if finetune_top else ("train", "val", "test"))]
    if finetune_top:
        feats = {s: split_activations_for(cfg, dataset.split(s), detector, encoder, feature_cache(cfg, out), s,
                                          cfg.data.views if s == "train" else ("identity",), group) for s in splits}
    else:
        feats = {s: split_features(cfg, dataset.split(s), detector, encoder, feature_cache(cfg, out), s, group)
                 for s in splits}
    for needed in ("train", "val"):
        if needed not in feats:
            raise DatasetError(f"{dataset.root / 'manifest.jsonl'}: training needs a {needed!r} split")

    labelled = dataset.has_labels
    if not labelled:
        warnings.warn(f"{dataset.root}: no category labels; positives are an image's own captions "
                      "and only instance metrics are reported", stacklevel=2)
    vocab = (Vocabulary.from_json(state["vocab"]) if state else
             Vocabulary.build([c for it in dataset.split("train") for c in it.captions], cfg.data.min_word_count))
    caps = {s: Captions.from_items(dataset.split(s), vocab, cfg.data.max_words, labelled) for s in feats}

    model = build_model(cfg.model, len(vocab), encoder.out_dim)
    if state is None and cfg.data.word_vectors:
        _init_word_vectors(model, vocab, cfg.data.word_vectors, echo)
    if tc.precision == "auto":
        echo(f"precision auto: {'bfloat16' if uses_bfloat16(tc.precision, device) else 'float32'} on {device}")
    model.to(device)
    top = list(encoder.top().parameters()) if finetune_top else []
    groups = [{"params": list(model.parameters())}]
    if top:
        encoder.to(device)
        groups.append({"params": top, "lr": tc.lr * tc.backbone_lr_scale})
    opt = torch.optim.Adam(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    history, best, start_epoch = [], -1.0, 0
    board = TensorBoard(out) if tc.tensorboard and main_rank else None
    if state is not None:
        model.load_state_dict(state["model"])
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        torch.set_rng_state(state["torch_rng"])
    # the moving average of the weights (train.ema_decay): validated, kept and exported in their place
    average = (WeightAverage({"model": model, "top": encoder.top()}, tc.ema_decay) if tc.ema_decay else None)
    if average is not None and state is not None:
        average.load_state_dict(state["ema"])

    common = {"config": cfg.to_dict(), "vocab": vocab.to_json(),
              "detector": detector.state_dict() if detector is not None else None,
              "feature_dim": encoder.out_dim, "classes": dataset.classes,
              "box_classes": dataset.box_classes, "data_root": str(dataset.root)}
    train_caps, train_feats = caps["train"], feats["train"]
    train_caps.word_dropout = tc.word_dropout
    val_caps = caps["val"].first_per_image(tc.val_captions)  # what each epoch's validation scores
    n_pairs = len(train_caps.lengths)
    steps = math.ceil(n_pairs / tc.batch_size)
    if group is not None and n_pairs % tc.batch_size and n_pairs % tc.batch_size < group.world:
        steps -= 1  # a last batch smaller than the group would leave a process without pairs
    batch_loss = BatchLoss(model, encoder.top() if finetune_top else None)
    for epoch in range(start_epoch, tc.epochs):
        if tc.patience and epochs_since_best(history) >= tc.patience:
            echo(f"early stop: no better validation MAP in the last {tc.patience} epochs "
                 f"(best {best:.4f} at epoch {epoch - epochs_since_best(history)})")
            log_event(out, event="early_stop", epoch=epoch, best=best)
            break
        model.train()
        order = np.random.default_rng([tc.seed, epoch]).permutation(n_pairs)
        train_caps.rng = step_draws(tc.seed, epoch, 2, group)
        if finetune_top:  # frozen for the first epochs; one random cached view per image and step
            encoder.top().requires_grad_(epoch >= tc.backbone_frozen_epochs)
            train_feats.rng = step_draws(tc.seed, epoch, 1, group)
        step_loss = data_parallel(batch_loss, group)  # rebuilt each epoch: the trained set may change
        epoch_cfg = cfg.model_copy(update={"loss": epoch_loss(cfg.loss, epoch)})  # a triplet warm-up
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", disable=not main_rank or None)
        t0, total = time.time(), 0.0
        for step in bar:
            idx = np.sort(order[step * tc.batch_size: (step + 1) * tc.batch_size])
            loss = train_step(step_loss, opt, epoch_cfg, train_feats, train_caps, idx, group)
            if average is not None:
                average.update()
            total += loss
            if board is not None:
                board.step(epoch * steps + step, loss)
            bar.set_postfix(loss=f"{loss:.4f}",
                            pairs_s=f"{(step + 1) * tc.batch_size / (time.time() - t0):.0f}")
        # validation on rank 0 (the others wait for its verdict, so every rank decides alike)
        with _averaged(average):
            val = _val_report(model, feats["val"], val_caps, Fusion(), tc.eval_chunk) if main_rank else None
        if group is not None:
            val = group.broadcast(val)
        val_map = val[val["primary"]]["map"]
        record = {"epoch": epoch + 1, "loss": total / steps, "val_map": val_map, "lr": opt.param_groups[0]["lr"],
                  "val_rsum": val["instance"]["rsum"]}
        if average is not None and main_rank:  # the trained weights' own figures, for comparison only
            trained = _val_report(model, feats["val"], val_caps, Fusion(), tc.eval_chunk)
            record.update(trained_val_map=trained[trained["primary"]]["map"], trained_val_rsum=trained["instance"]["rsum"])
        record["seconds"] = time.time() - t0
        history.append(record)
        if main_rank:
            log_event(out, event="epoch", **record)
            plot_curves(out / "log.jsonl", out / "curves.png")
        if board is not None:
            board.epoch(record)
        improved = val_map > best
        best = max(best, val_map)
        if not improved and tc.plateau_decay < 1.0:  # a plateau: smaller steps from here on
            for param_group in opt.param_groups:
                param_group["lr"] *= tc.plateau_decay
            echo(f"no better validation MAP: learning rate x {tc.plateau_decay} -> {opt.param_groups[0]['lr']:.2e}")
        echo(f"epoch {epoch + 1}: loss {record['loss']:.4f}  val MAP {val_map:.4f}  R@sum {record['val_rsum']:.1f}"
             f"{'  (best)' if improved else ''}  [{record['seconds']:.0f}s]")
        if main_rank:  # rank 0 writes the checkpoints; the ranks' weights are the same
            payload = {**common, "epoch": epoch + 1, "history": history,
                       "best": best, "fusion": vars(Fusion()), "val_metrics": _summary(val)}
            if improved:
                with _averaged(average):
                    save_checkpoint(out / "best.pt", {**payload, "model": model.state_dict(),
                                                      "encoder": encoder.state_dict()})
            # last.pt: the trained weights (and their average), what --resume continues from
            save_checkpoint(last, {**payload, "model": model.state_dict(), "encoder": encoder.state_dict(),
                                   "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                                   **({"ema": average.state_dict()} if average is not None else {})})

    if board is not None:
        board.close()
    if group is not None:
        group.barrier()  # the last checkpoint is on disk for every rank
        destroy(group)
        if not main_rank:
            return None, None
    # 4. fusion weights on validation, then the test split
    if not choose_weights:
        return out / "best.pt", None
    best_ckpt = load_checkpoint(out / "best.pt")
    model.load_state_dict(best_ckpt["model"])
    encoder.load_state_dict(best_ckpt["encoder"])
    val_sims = score_split(model, feats["val"], caps["val"], tc.eval_chunk)
    fusion, val = choose_fusion(model, val_sims, caps["val"], tc.fusion_grid, tc.global_grid)
    if model.searches_fusion:
        echo(f"fusion weights (val): alpha={fusion.alpha} beta={fusion.beta} lambda={fusion.lam}"
             + (f" mu={fusion.mu}" if GLOBAL in val_sims else ""))
    save_checkpoint(out / "best.pt", {**best_ckpt, "fusion": vars(fusion), "val_metrics": _summary(val)})
    log_event(out, event="fusion", fusion=vars(fusion), val=_summary(val))
    return out / "best.pt", val_sims


class BatchLoss(torch.nn.Module):
    """The loss of one mini-batch (Algorithm 1's step): every (branch, level) similarity matrix's
    loss, summed. A module, so that DistributedDataParallel can wrap it: under torchrun each
    process encodes its share of the batch and the loss still sees the whole batch
    (:mod:`fbnet.distributed`). ``top`` is the backbone's fine-tuned top, when there is one."""

    def __init__(self, model: torch.nn.Module, top: torch.nn.Module | None = None):
        super().__init__()
        self.model, self.top = model, top

    def forward(self, cfg: FBNetConfig, feats: SplitFeatures, caps: Captions, idx: np.ndarray,
                group: Group | None = None) -> torch.Tensor:
        model = self.model
        device = next(model.parameters()).device
        mine = idx[group.share(len(idx))] if group is not None else idx
        # bfloat16: the encoders' matrix products (the Bi-GRUs, the block projections) may run in
        # bfloat16 (train.precision); the cross attention and the loss stay float32
        with torch.autocast(device.type, torch.bfloat16, enabled=uses_bfloat16(cfg.train.precision, device)):
            images = model.encode_images(*(t.to(device) for t in feats.tensors(caps.image[mine])))
            texts = model.encode_texts(*(t.to(device) for t in caps.tensors(mine)))
        # every image of the batch against this process's captions: its columns of each matrix
        images = {k: (gather(b.float(), group), gather(m.float(), group)) for k, (b, m) in images.items()}
        texts = {k: t.float() for k, t in texts.items()}
        sims = {k: gather(s.t(), group).t() for k, s in model.similarities(images, texts).items()}
        img_idx = caps.image[idx]
        same = (caps.labels[idx][:, None] == caps.labels[idx][None, :]) if caps.labels is not None \
            else (img_idx[:, None] == img_idx[None, :])
        positive = torch.from_numpy(same).to(device)
        loss_fn = pair_loss(cfg.loss)
        return sum(loss_fn(s, positive, cfg.loss) for s in sims.values())


def step_draws(seed: int, epoch: int, stream: int, group: Group | None) -> np.random.Generator:
    """The generator of one kind of per-step draw (1: cached views, 2: word dropout) for an epoch,
    separate per torchrun process, so a resumed run repeats its epochs' draws."""
    return np.random.default_rng([seed, epoch, stream] + ([group.rank] if group else []))


def data_parallel(batch_loss: BatchLoss, group: Group | None) -> torch.nn.Module:
    """``batch_loss`` as DistributedDataParallel in a torchrun group (gradients averaged over the
    processes after backward), else itself. Only parameters that require gradients now are
    synchronised, so it is built again when that set changes (the backbone's top unfrozen)."""
    if group is None:
        return batch_loss
    device = next(batch_loss.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(
        batch_loss, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def train_step(step_loss: torch.nn.Module, opt: torch.optim.Optimizer, cfg: FBNetConfig, feats: SplitFeatures,
               caps: Captions, idx: np.ndarray, group: Group | None = None) -> float:
    """One optimisation step on the captions ``idx`` and their images (:class:`BatchLoss`, or its
    :func:`data_parallel` form); returns the loss."""
    loss = step_loss(cfg, feats, caps, idx, group)
    opt.zero_grad()
    loss.backward()
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.train.grad_clip)
    opt.step()
    return float(loss.detach())


@functools.cache
def uses_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether ``train.precision`` runs the encoders' matrix products in bfloat16 on ``device``:
    ``auto`` asks the hardware (oneDNN's native bfloat16 on CPUs, ``is_bf16_supported`` on GPUs)."""
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
              else torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "bfloat16" and not native:
        warnings.warn(f"train.precision is bfloat16 but {device.type} has no native bfloat16 matrix products: "
                      "they are emulated, about 10x slower than float32; use precision: auto", stacklevel=2)
    return precision == "bfloat16" or (precision == "auto" and native)


def training_device(name: str) -> torch.device:
    """``train.device`` as a torch device; ``auto`` is CUDA when a GPU is visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but torch sees no CUDA GPU "
                           f"(torch {torch.__version__}); use train.device: cpu or auto")
    return torch.device(name)


def epochs_since_best(history: list[dict]) -> int:
    """Epochs after the one with the best validation MAP (the first such epoch on ties)."""
    if not history:
        return 0
    maps = [h["val_map"] for h in history]
    return len(maps) - 1 - maps.index(max(maps))


def _frozen_stages(cfg, dataset, out, n_box_classes, echo):
    det_path = out / "detector.pt"
    dc = cfg.model.detector
    saved = torch.load(det_path, map_location="cpu", weights_only=True) if det_path.is_file() else None
    detector, encoder = build_frozen(cfg, n_box_classes, detector_state=saved)
    needs_finetune = (detector is not None and saved is None and not dc.weights
                      and dc.name == "fasterrcnn_light")
    if needs_finetune:
        if not dataset.has_boxes:
            raise DatasetError(f"{dataset.root}: detector 'fasterrcnn_light' needs boxes to fine-tune on; "
                             "give model.detector.weights or use detector 'none'")
        items = [it for it in dataset.split("train") if it.boxes]
        size = cfg.model.backbone.image_size
        echo(f"fine-tuning the detector on {len(items)} training images' boxes")
        images = np.stack([load_image(it.image, size) for it in items])
        boxes = [_scale_boxes(it, size) for it in items]
        hist = finetune(detector, images, boxes, dc, seed=cfg.train.seed)
        log_event(out, event="detector", history=hist)
        torch.save(detector.state_dict(), det_path)
        detector, encoder = build_frozen(cfg, n_box_classes, detector_state=detector.state_dict())
    return detector, encoder


def _scale_boxes(item, size):
    from PIL import Image

    with Image.open(item.image) as im:
        w, h = im.size
    return [[b[0] * size / w, b[1] * size / h, b[2] * size / w, b[3] * size / h, b[4]] for b in item.boxes]


def _init_word_vectors(model, vocab: Vocabulary, path: str, echo) -> None:
    vectors, dim = load_word_vectors(path, set(vocab.words))
    if dim != model.cfg.word_dim:
        raise WordVectorError(f"{path}: vectors are {dim}-d but model.word_dim is {model.cfg.word_dim}")
    hits = [i for i, w in enumerate(vocab.words) if w in vectors]
    for enc in model.text.values():
        with torch.no_grad():
            for i in hits:
                enc.embed.weight[i] = torch.from_numpy(vectors[vocab.words[i]])
    echo(f"word vectors: {len(hits)} of {len(vocab) - 2} vocabulary words "
         f"({100 * len(hits) / max(1, len(vocab) - 2):.1f}%) initialised from {path}")


def _averaged(average: WeightAverage | None):
    """The moving average's weights in place inside the block (nothing changes without one)."""
    return average.applied() if average is not None else contextlib.nullcontext()


def _val_report(model, feats, caps, fusion, chunk):
    sims = score_split(model, feats, caps, chunk)
    return retrieval_report(model.fuse(sims, fusion), caps.image, caps.image_labels, caps.labels)


def choose_fusion(model, sims: dict, caps: Captions, grid, global_grid=(1.0,)) -> tuple[Fusion, dict]:
    """Grid search of eq. (7)'s alpha, beta, lambda (and mu, the pooled global branch's weight, over
    ``global_grid`` when the model has one) for the best validation MAP (FB-Net; the related models
    fuse with weights of their own, so their grid is one point)."""
    has_fg = any(b == "foreground" for b, _ in sims)
    levels = max(u for b, u in sims if b != "global")
    grid = grid if model.searches_fusion else (1.0,)
    mus = global_grid if model.searches_fusion and GLOBAL in sims else (1.0,)
    best = None
    for alpha, beta, lam, mu in itertools.product(grid if has_fg else (1.0,), grid if levels > 1 else (1.0,),
                                                  grid if levels > 2 else (1.0,), mus):
        fusion = Fusion(alpha, beta, lam, mu)
        rep = retrieval_report(model.fuse(sims, fusion), caps.image, caps.image_labels, caps.labels)
        score = rep[rep["primary"]]["map"]
        if best is None or score > best[0] + 1e-12:
            best = (score, fusion, rep)
    return best[1], best[2]


def _summary(report: dict) -> dict:
    """A report without its PR curves (for checkpoints and logs)."""
    out = {k: v for k, v in report.items() if not isinstance(v, dict)}
    for kind in ("category", "instance"):
        if kind in report:
            out[kind] = {d: {k: v for k, v in report[kind][d].items() if k != "pr"} for d in ("i2t", "t2i")}
            out[kind]["map"], out[kind]["rsum"] = report[kind]["map"], report[kind]["rsum"]
    return out
