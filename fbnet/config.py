"""Typed configuration for data, model and training (one YAML/JSON file, all sections optional).

``FBNetConfig.load(path)`` reads a file; unknown keys are an error that names the file and key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    #: Dataset directory in the fbnet layout (see docs/data.md); empty = embedded synthetic default.
    root: str = ""
    #: Captions longer than this many tokens are truncated.
    max_words: int = 32
    #: Words seen fewer times than this in the training captions map to <unk>.
    min_word_count: int = 1
    #: Optional word2vec binary or GloVe text file to initialise the 300-d word embeddings.
    word_vectors: str = ""
    #: Directory of cached block features, shared by every run whose frozen stages match (the
    #: cache is keyed by backbone, detector, levels and their weights); empty = ``<run>/features``.
    feature_cache: str = ""
    #: Views of every training image cached when the backbone's top is fine-tuned, one sampled
    #: per image and step: ``identity`` and ``hflip`` (the canvas mirrored, boxes with it).
    views: tuple[str, ...] = ("identity",)


@dataclass
class BackboneConfig:
    #: ``alexnet`` (the paper: fc7, 4096-d), ``mobilenet_v2`` (1280-d) or ``resnet18`` (512-d).
    name: str = "mobilenet_v2"
    #: ``""`` random init (seeded), ``"imagenet"`` torchvision's weights API, or a state_dict path.
    weights: str = ""
    #: ``roi``: one backbone pass per image, blocks pooled from the feature map with RoIAlign.
    #: ``crop``: the paper's mode, one backbone pass per cropped and resized block.
    mode: str = "roi"
    #: Side of the square canvas every image is resized to before windows are cut.
    image_size: int = 224
    #: Side each block is resized to in ``crop`` mode.
    crop_size: int = 224
    #: ``roi`` mode: how many of the trunk's last modules are fine-tuned (0 = all frozen; for
    #: MobileNetV2, 2 = the last inverted-residual block and the 1x1 convolution to 1280). Training
    #: then caches the frozen part's activations per image (``fbnet.activations``).
    trainable_blocks: int = 0


@dataclass
class DetectorConfig:
    #: ``fasterrcnn`` (the paper's choice; torchvision), ``fasterrcnn_light`` (small backbone,
    #: trained on the dataset's boxes in minutes on a CPU) or ``none`` (whole image as the box).
    name: str = "fasterrcnn_light"
    #: Optional detector state_dict path; when empty and the dataset has boxes, it is fine-tuned.
    weights: str = ""
    #: At most J boxes per image (paper: 9) with confidence at least this (paper: 0.1).
    max_boxes: int = 9
    score_threshold: float = 0.1
    #: Fine-tuning budget on the dataset's boxes.
    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.01


@dataclass
class ModelConfig:
    #: Which model scores the pairs (see :mod:`fbnet.models.registry`): ``fbnet`` (this paper),
    #: ``scan``, ``dsrln``, ``rgf`` or ``sfe`` (the related region-word models).
    name: str = "fbnet"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    #: Joint embedding size d (paper: 1024).
    embed_dim: int = 1024
    #: Word embedding size (paper: 300).
    word_dim: int = 300
    #: Levels of the multi-scale scan (paper: 1-3, i.e. 1, 4 and 9 blocks / text windows).
    levels: int = 3
    #: Branches: ``background`` (B-Net) and/or ``foreground`` (F-Net).
    branches: tuple[str, ...] = ("background", "foreground")
    #: Inverse softmax temperatures of the stacked cross attention (eqs. 13-15).
    delta1: float = 4.0
    delta2: float = 9.0
    #: Region-word models: SCAN's attention direction (``t2i``, ``i2t`` or ``both``), pooling of
    #: the unit relevances (``avg`` or ``lse``) and LogSumExp's lambda_2 (Lee et al. 2018).
    direction: str = "t2i"
    pooling: str = "lse"
    lse_lambda: float = 6.0
    #: Region-word models: attention heads of their self- and cross-attention steps, and SFE's
    #: number of semantic concepts (external cues).
    heads: int = 4
    concepts: int = 64
    #: FB-Net: a pooled global branch beside eq. (7)'s six matrices: ``gpo`` (VSE-infinity's
    #: generalized pooling), ``max``, ``mean`` or ``""`` (none). Its weight mu is chosen on dev.
    global_pool: str = ""


@dataclass
class LossConfig:
    #: ``dsaw`` (eqs. 16-21) or ``triplet`` (VSE++ hardest negative, the paper's ablation).
    name: str = "dsaw"
    sigma: float = 50.0
    theta: float = 20.0
    gamma: float = 0.2
    #: Mining slack: a pair is kept when it is within this of the hardest opposite pair.
    epsilon: float = 0.1
    #: Margin of the triplet alternative.
    margin: float = 0.2


@dataclass
class TrainConfig:
    #: The most epochs a run trains for.
    epochs: int = 20
    #: Early stopping: stop once this many epochs in a row brought no better validation MAP
    #: (0 = train every epoch). A resumed run counts the epochs it already has.
    patience: int = 0
    #: Learning rate x this after each epoch without a better validation MAP (1 = constant).
    plateau_decay: float = 1.0
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    seed: int = 0
    #: Captions per image that the per-epoch validation scores (0 = all). Validation costs
    #: images x captions cross-attention pairs; the fusion search and the final report use all.
    val_captions: int = 0
    #: Pairs scored per chunk at evaluation (bounds memory).
    eval_chunk: int = 256
    #: Grid for the fusion weights alpha, beta, lambda (paper's sensitivity study).
    fusion_grid: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    #: Grid for mu, the weight of the pooled global branch (``model.global_pool``) in the fusion.
    global_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    #: Fine-tuned backbone top (``model.backbone.trainable_blocks``): its learning rate is
    #: ``lr`` x this, and it stays frozen for the first ``backbone_frozen_epochs`` epochs.
    backbone_lr_scale: float = 0.1
    backbone_frozen_epochs: int = 1
    num_threads: int = 0
    #: Where the epochs run: ``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when a GPU is visible).
    #: Feature extraction and the frozen stages stay on the CPU; CPU runs are deterministic.
    device: str = "cpu"
    #: ``float32``, or ``bfloat16``: the encoders' matrix products in bfloat16 (CPU autocast; about
    #: 2.7x the float32 matmul rate on CPUs with AVX512-BF16 or AMX, and on GPUs), the cross
    #: attention, the loss and evaluation in float32.
    precision: str = "float32"


@dataclass
class FBNetConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>") -> "FBNetConfig":
        return _build(cls, data or {}, source, "")

    @classmethod
    def load(cls, path: str | Path) -> "FBNetConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # yaml and json both say where
            raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'yaml'}: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        return cls.from_dict(data or {}, str(path))

    def validate(self) -> None:
        m = self.model
        from .models.registry import MODELS

        if m.name not in MODELS:
            raise ConfigError(f"model.name: unknown model {m.name!r} (known: {', '.join(MODELS)})")
        if m.direction not in ("t2i", "i2t", "both") or m.pooling not in ("avg", "lse"):
            raise ConfigError(f"model.direction must be t2i, i2t or both and model.pooling avg or lse, "
                              f"not {m.direction!r} / {m.pooling!r}")
        if m.embed_dim % m.heads:
            raise ConfigError(f"model.heads ({m.heads}) must divide model.embed_dim ({m.embed_dim})")
        if m.backbone.name not in ("alexnet", "mobilenet_v2", "resnet18", "detector"):
            raise ConfigError(f"model.backbone.name: unknown backbone {m.backbone.name!r}")
        if m.backbone.mode not in ("roi", "crop"):
            raise ConfigError(f"model.backbone.mode must be 'roi' or 'crop', not {m.backbone.mode!r}")
        if not m.branches or any(b not in ("background", "foreground") for b in m.branches):
            raise ConfigError(f"model.branches must name 'background' and/or 'foreground': {m.branches}")
        if not 1 <= m.levels <= 3:
            raise ConfigError(f"model.levels must be 1, 2 or 3, not {m.levels}")
        if self.loss.name not in ("dsaw", "triplet"):
            raise ConfigError(f"loss.name must be 'dsaw' or 'triplet', not {self.loss.name!r}")
        if self.train.precision not in ("float32", "bfloat16"):
            raise ConfigError(f"train.precision must be float32 or bfloat16, not {self.train.precision!r}")
        if not 0.0 < self.train.plateau_decay <= 1.0:
            raise ConfigError(f"train.plateau_decay must be in (0, 1], not {self.train.plateau_decay}")
        if self.train.patience < 0:
            raise ConfigError(f"train.patience must be >= 0, not {self.train.patience}")
        if self.train.device != "auto" and self.train.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"train.device must be cpu, cuda, cuda:N or auto, not {self.train.device!r}")
        if m.backbone.trainable_blocks < 0 or (m.backbone.trainable_blocks and (
                m.backbone.mode != "roi" or m.backbone.name == "detector")):
            raise ConfigError("model.backbone.trainable_blocks must be >= 0, and fine-tuning needs "
                              f"mode 'roi' and a torchvision backbone (not {m.backbone.name!r}/{m.backbone.mode!r})")
        if any(v not in ("identity", "hflip") for v in self.data.views) or self.data.views[:1] != ("identity",):
            raise ConfigError(f"data.views must start with 'identity' and name identity/hflip: {self.data.views}")
        if m.global_pool not in ("", "gpo", "max", "mean"):
            raise ConfigError(f"model.global_pool must be gpo, max, mean or empty, not {m.global_pool!r}")
        if m.detector.name not in ("fasterrcnn", "fasterrcnn_light", "yolov3_tiny", "none"):
            raise ConfigError(f"model.detector.name: unknown detector {m.detector.name!r}")


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names where."""


def _build(cls, data: dict[str, Any], source: str, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known: {known})")
        ftype = fields[key].type
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, source, f"{prefix}{key}.")
        elif isinstance(default, tuple):
            kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        elif isinstance(default, bool) or default is None:
            kwargs[key] = value
        elif isinstance(default, (int, float, str)):
            try:
                kwargs[key] = type(default)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: '{prefix}{key}' must be {ftype}, not {value!r}") from None
        else:
            kwargs[key] = value
    return cls(**kwargs)
