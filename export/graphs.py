"""The deployable graphs a checkpoint splits into, as torch modules ready for ONNX export.

* :class:`DetectorGraph`: ``image (1, 3, S, S)`` -> ``boxes (1, J, 4)``, ``scores (1, J)``: the
  top J detections with score >= threshold, zero-padded (post-processing inside the graph). When
  the detector is the distilled head on MobileNetV2 (:mod:`fbnet.models.mobilenet_head`) and its
  frozen layers are the image encoder's, it also returns its last map, ``lower (1, 160, S/32,
  S/32)``, and the image encoder starts from it (:func:`shared_stage`): MobileNetV2's first 17
  modules then run once per photo, not twice.
* :class:`ImageEncoderGraph`: ``image (N, 3, S, S)`` (or ``lower``) + ``block_boxes (N, (1+J)*B, 4)`` +
  ``fg_mask (N, J)`` -> unit block embeddings per branch and level, ``blocks_B1`` ... ``blocks_F3``
  (cropping by RoIAlign, or in ``roi`` mode pooling as a product with RoIAlign's weights, inside
  the graph). J is dynamic (any count up to the bundle's J): the runtime feeds only the box slots
  a batch uses, so empty slots are neither pooled, projected nor sorted by GPO.
* :class:`TextEncoderGraph`: ``ids (N, L)`` + ``lengths (N,)`` -> unit text-window embeddings per
  branch and level, ``windows_B1`` ... ``windows_F3`` (the GRU runs on lengths; no packing).
* :class:`ScorerGraph`: a batch of images' block embeddings + ``fg_mask`` x a batch of captions'
  window embeddings -> ``similarity (I, C)`` fused by eq. (7), and ``sim_B1`` ... ``sim_F3``.
  The box axis is dynamic (``boxes``; ``box_blocks_<u>`` = u**2 boxes for F-Net's blocks), so the
  runtime feeds images grouped by box count without padded slots.
  Exported twice: ``scorer`` (image Gram matrices: many captions per call) and ``reranker``
  (attended images built directly: the runtime's choice for one caption against a shortlist;
  see :mod:`fbnet.models.attention`). Same inputs, outputs and values.
"""

from __future__ import annotations

import torch
from torch import nn

from fbnet.models.backbone import BlockEncoder
from fbnet.models.fbnet import BRANCH_KEY, Fusion
from fbnet.models.mobilenet_head import STAGES, MobileNetHeadDetector
from fbnet.windows import blocks_per_level, blocks_upto


def key_name(prefix: str, branch: str, level: int) -> str:
    return f"{prefix}_{BRANCH_KEY[branch]}{level}"


def shared_stage(detector, encoder: BlockEncoder) -> int | None:
    """How many MobileNetV2 modules the detector's last map and the image encoder's frozen trunk
    have in common, when the image encoder can start from that map: the detector is the distilled
    head, the encoder pools MobileNetV2 (``roi`` mode, output stride 32: a dilated last stage is
    another computation) and freezes at least those modules, and their weights are equal. None
    otherwise (each graph then runs its own CNN on the image)."""
    end = STAGES[-1][1]
    if not isinstance(detector, MobileNetHeadDetector) or encoder.cfg.name != "mobilenet_v2" \
            or encoder.cfg.mode != "roi" or encoder.stride != 32 or encoder.split_at < end:
        return None
    mine = [t for stage in detector.stages for t in stage.state_dict().values()]
    theirs = list(encoder.trunk[:end].state_dict().values())
    same = len(mine) == len(theirs) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs))
    return end if same else None


def trunk_prefix(reference: BlockEncoder, encoder: BlockEncoder) -> int:
    """How many leading trunk modules ``encoder`` computes exactly as ``reference`` does, up to its
    frozen part (``split_at``): the modules' weights and buffers are equal, and so is their geometry
    (``repr`` shows every convolution's stride, padding and dilation, so a stage dilated for output
    stride 16 ends the prefix). 0 where the two cannot share a map: another backbone, a ``crop``
    mode or the detector's trunk. An ensemble's members share the map after that many modules
    (:class:`TrunkGraph`, :mod:`fbnet.export.trunk`)."""
    if "detector" in (reference.cfg.name, encoder.cfg.name) or "crop" in (reference.cfg.mode, encoder.cfg.mode) \
            or reference.cfg.name != encoder.cfg.name:
        return 0
    n = 0
    for mine, theirs in zip(reference.trunk[: encoder.split_at], encoder.trunk[: encoder.split_at]):
        a, b = mine.state_dict(), theirs.state_dict()
        if repr(mine) != repr(theirs) or a.keys() != b.keys() or \
                not all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
            break
        n += 1
    return n


class TrunkGraph(nn.Module):
    """``image (N, 3, S, S)`` -> the reference trunk's maps after each of ``cuts`` modules
    (``lower_<cut>``, ascending): one pass of the CNN that an ensemble's members share, each member's
    image encoder starting from its cut (``ImageEncoderGraph(..., shared=cut)``)."""

    def __init__(self, encoder: BlockEncoder, cuts: list[int]):
        super().__init__()
        self.encoder, self.cuts = encoder, sorted(set(cuts))

    def forward(self, image: torch.Tensor):
        x, start, maps = (image - self.encoder.mean) / self.encoder.std, 0, []
        for cut in self.cuts:
            x = self.encoder.trunk[start:cut](x)
            maps.append(x)
            start = cut
        return tuple(maps)


class DetectorGraph(nn.Module):
    def __init__(self, detector, share_lower: bool = False):
        """``share_lower``: also return the detector's last map (see :func:`shared_stage`)."""
        super().__init__()
        self.detector, self.share_lower = detector, share_lower
        self.j, self.threshold = detector.max_boxes, detector.score_threshold

    def forward(self, image: torch.Tensor):
        if self.share_lower:
            maps = self.detector.maps(image)
            found_boxes, found_scores = self.detector.kept(maps, image.shape[-1])[0]
        else:
            found_boxes, found_scores = self.detector.detections(image[0])
        # pad with zeros, then keep the first J: no data-dependent shapes leave the graph
        boxes = torch.cat([found_boxes, torch.zeros(self.j, 4)], dim=0)[: self.j]
        scores = torch.cat([found_scores, torch.zeros(self.j)], dim=0)[: self.j]
        keep = (scores >= self.threshold).to(scores.dtype)
        out = ((boxes * keep.unsqueeze(1)).unsqueeze(0), (scores * keep).unsqueeze(0))
        return (*out, maps[-1]) if self.share_lower else out


class ImageEncoderGraph(nn.Module):
    def __init__(self, encoder: BlockEncoder, model, shared: int | None = None):
        """``shared``: the graph's first input is the detector's map after this many MobileNetV2
        modules (:func:`shared_stage`), not the image."""
        super().__init__()
        self.encoder, self.model, self.shared = encoder, model, shared

    def forward(self, first: torch.Tensor, block_boxes: torch.Tensor, fg_mask: torch.Tensor):
        n, j, nb = first.shape[0], fg_mask.shape[1], blocks_upto(self.model.levels)
        if self.shared is None:
            feats = self.encoder(first, block_boxes)
        else:
            feats = self.encoder.pool_blocks(self.encoder.trunk[self.shared: self.encoder.split_at](first), block_boxes)
        feats = feats.reshape(n, 1 + j, nb, -1)
        # F-Net boxes, level 1, as fractions of the canvas
        regions = block_boxes.reshape(n, 1 + j, nb, 4)[:, 1:, 0] / self.encoder.cfg.image_size
        enc = self.model.encode_images(feats[:, 0], feats[:, 1:], fg_mask, regions, static_shapes=True)
        return tuple(enc[k][0] for k in self.model.keys)


class TextEncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        enc = self.model.encode_texts(ids, lengths, static_shapes=True)
        return tuple(enc[k] for k in self.model.keys)


class ScorerGraph(nn.Module):
    """Inputs: ``fg_mask`` then, per key, the blocks; then, per key, the windows."""

    def __init__(self, model, fusion: Fusion, attended_images: str = "gram"):
        super().__init__()
        self.model, self.fusion, self.attended_images = model, fusion, attended_images

    def forward(self, fg_mask: torch.Tensor, *tensors: torch.Tensor):
        keys = self.model.keys
        blocks, windows = tensors[: len(keys)], tensors[len(keys):]
        images = {}
        for key, b in zip(keys, blocks):
            branch, level = key
            if branch == "background":
                mask = torch.ones(b.shape[:2], dtype=b.dtype)
            else:
                mask = fg_mask.to(b.dtype).repeat_interleave(blocks_per_level(level), dim=1)
            images[key] = (b, mask)
        sims = self.model.similarities(images, dict(zip(keys, windows)), self.attended_images, static_shapes=True)
        return (self.model.fuse(sims, self.fusion), *(sims[k] for k in keys))


def graph_io(model, shared: bool = False) -> dict[str, dict]:
    """Input/output names and dynamic axes of every graph (what the manifest records); ``shared``:
    the detector passes its last map to the image encoder (:func:`shared_stage`)."""
    keys = model.keys
    blocks = [key_name("blocks", *k) for k in keys]
    windows = [key_name("windows", *k) for k in keys]
    # word units (the region-word models): as many as the caption's words
    text_axes = {key_name("windows", *k): ({0: "captions", 1: "words"} if k in model.word_keys else {0: "captions"})
                 for k in keys}
    sims = [key_name("sim", *k) for k in keys]
    first = "lower" if shared else "image"
    # the box axis is dynamic too: the runtime encodes only the box slots a batch uses and scores
    # gallery chunks grouped by box count, each cut to its count (F-Net level u has u**2 blocks a
    # box: axis "box_blocks_<u>")
    box_axis = {key_name("blocks", b, u): f"box_blocks_{u}" for b, u in keys if b == "foreground"}
    block_axes = {"fg_mask": {0: "images", 1: "boxes"},
                  **{n: {0: "images", **({1: box_axis[n]} if n in box_axis else {})} for n in blocks}}
    scorer = {"inputs": ["fg_mask", *blocks, *windows], "outputs": ["similarity", *sims],
              "dynamic": {**block_axes, **text_axes,
                          **{n: {0: "images", 1: "captions"} for n in ["similarity", *sims]}}}
    return {
        "detector": {"inputs": ["image"], "outputs": ["boxes", "scores", *(["lower"] if shared else [])],
                     "dynamic": {}},
        "image_encoder": {"inputs": [first, "block_boxes", "fg_mask"], "outputs": blocks,
                          "dynamic": {first: {0: "images"}, "block_boxes": {0: "images", 1: "region_blocks"},
                                      **block_axes}},
        "text_encoder": {"inputs": ["ids", "lengths"], "outputs": windows,
                         "dynamic": {"ids": {0: "captions", 1: "words"}, "lengths": {0: "captions"},
                                     **text_axes}},
        "scorer": scorer,
        "reranker": scorer,
    }
