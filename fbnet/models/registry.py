"""The registries: the models fbnet trains, exports and serves (``model.name``), and the
backbones, detectors and losses they are built with. Adding one is a module and a line here;
:mod:`fbnet.config` accepts exactly these names, and the builders look them up here.

Every model implements :class:`RetrievalModel` (the one description of the model interface;
``docs/models.md`` points here). Training, evaluation, export and the torch-free runtime use
only that interface.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable


@runtime_checkable
class RetrievalModel(Protocol):
    """What a registered model is, for training, evaluation, export and the runtime.

    Built as ``cls(cfg: ModelConfig, vocab_size, feature_dim)`` from the cached block features of
    :mod:`fbnet.features` (B-Net blocks ``(N, B, C)``, F-Net blocks ``(N, J, B, C)``, the box mask
    ``(N, J)`` and the F-Net region boxes ``(N, J, 4)`` as fractions of the canvas).
    """

    #: the similarity matrices it scores, as ``(branch, level)``, named by the runtime's unit
    #: layout: ``B<u>`` a fixed number of units per image, ``F<u>`` ``u**2`` units per detector
    #: box, ``G1`` one pooled vector per image (FB-Net's global branch)
    keys: list[tuple[str, int]]
    #: keys whose text units are words (a variable number per caption, padded by the runtime)
    word_keys: tuple
    #: whether training grid-searches eq. (7)'s fusion weights on validation
    searches_fusion: bool

    def encode_images(self, background, foreground, fg_mask, boxes=None, static_shapes: bool = False) -> dict:
        """``{key: (units (N, K, d), mask (N, K))}``; ``static_shapes`` is the exported form."""

    def encode_texts(self, ids, lengths, static_shapes: bool = False) -> dict:
        """``{key: units (C, M, d)}`` (word keys zero past each caption's words)."""

    def similarities(self, images: dict, texts: dict, attended_images: str = "gram",
                     static_shapes: bool = False) -> dict:
        """``{key: (I, C) similarity matrix}``."""

    def fuse(self, sims: dict, fusion) -> object:
        """The score the model ranks by, from its per-key matrices and fusion weights."""


#: ``model.name`` -> ``module:class`` (imported on use).
MODELS = {
    "fbnet": "fbnet.models.fbnet:FBNet",
    "scan": "fbnet.models.scan:SCAN",
    "dsrln": "fbnet.models.dsrln:DSRLN",
    "rgf": "fbnet.models.rgf:RGF",
    "sfe": "fbnet.models.sfe:SFE",
}


#: ``model.backbone.name`` -> the block feature size it gives (:mod:`fbnet.models.backbone`).
BACKBONES = {"alexnet": 4096, "mobilenet_v2": 1280, "resnet18": 512, "detector": 512}

#: ``model.detector.name`` -> ``module:class`` (a :class:`fbnet.models.detector.Detector` with
#: ``from_config``); ``none`` = no detector, the whole image as the only box.
DETECTORS = {
    "fasterrcnn": "fbnet.models.fasterrcnn:TorchvisionDetector",
    "fasterrcnn_light": "fbnet.models.fasterrcnn:TorchvisionDetector",
    "yolov3_tiny": "fbnet.models.yolo:YoloDetector",
    "mobilenet_v2_head": "fbnet.models.mobilenet_head:MobileNetHeadDetector",
    "none": None,
}

#: ``loss.name`` -> ``module:function`` (:mod:`fbnet.losses`).
LOSSES = {"dsaw": "fbnet.losses:dsaw_loss", "triplet": "fbnet.losses:triplet_loss",
          "triplet_sum": "fbnet.losses:triplet_sum_loss"}


def resolve(registry: dict, name: str, what: str):
    """The object ``registry[name]`` names (imported on use)."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(registry)})")
    if registry[name] is None:
        return None
    module, attr = registry[name].split(":")
    return getattr(importlib.import_module(module), attr)


def model_class(name: str) -> type[RetrievalModel]:
    return resolve(MODELS, name, "model")


def build_model(cfg, vocab_size: int, feature_dim: int) -> RetrievalModel:
    """The model ``cfg.name`` (a :class:`~fbnet.config.ModelConfig`), freshly initialised."""
    return model_class(cfg.name)(cfg, vocab_size, feature_dim)
