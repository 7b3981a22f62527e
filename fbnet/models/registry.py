"""The models fbnet trains, exports and serves, by ``model.name``: adding one is a module and a line.

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


def model_class(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    module, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(cfg, vocab_size: int, feature_dim: int):
    """The model ``cfg.name`` (a :class:`~fbnet.config.ModelConfig`), freshly initialised."""
    return model_class(cfg.name)(cfg, vocab_size, feature_dim)
