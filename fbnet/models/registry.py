"""The registries: the models fbnet trains, exports and serves (``model.name``), and the
backbones, detectors and losses they are built with. Adding one is a module and a line here;
:mod:`fbnet.config` accepts exactly these names, and the builders look them up here.

Every model takes the same cached block features (B-Net and F-Net blocks of
:mod:`fbnet.features`), the same captions, and gives the same interface: ``keys`` (the
similarity matrices it scores, named by the runtime's unit layout: ``B<u>`` a fixed number of
units per image, ``F<u>`` ``u**2`` units per detector box), ``encode_images``, ``encode_texts``,
``similarities``, ``fuse`` and ``searches_fusion`` (whether training grid-searches eq. (7)'s
weights). Training, evaluation, export and the torch-free runtime only use that interface.
"""

from __future__ import annotations

import importlib

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
    "none": None,
}

#: ``loss.name`` -> ``module:function`` (:mod:`fbnet.losses`).
LOSSES = {"dsaw": "fbnet.losses:dsaw_loss", "triplet": "fbnet.losses:triplet_loss"}


def resolve(registry: dict, name: str, what: str):
    """The object ``registry[name]`` names (imported on use)."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(registry)})")
    if registry[name] is None:
        return None
    module, attr = registry[name].split(":")
    return getattr(importlib.import_module(module), attr)


def model_class(name: str):
    return resolve(MODELS, name, "model")


def build_model(cfg, vocab_size: int, feature_dim: int):
    """The model ``cfg.name`` (a :class:`~fbnet.config.ModelConfig`), freshly initialised."""
    return model_class(cfg.name)(cfg, vocab_size, feature_dim)
