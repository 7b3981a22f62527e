"""Typed configuration for data, model and training (one YAML/JSON file, all sections optional).

``FBNetConfig.load(path)`` reads a file and validates it with pydantic: types, ranges and
cross-field rules are checked at load, and an error names the file and the key
(``c.yaml: train.epochs: must be >= 1 (got -3)``); an unknown key is an error too, so a typo never
silently falls back to a default. The names a config may give for models, backbones, detectors
and losses are the keys of the registries in :mod:`fbnet.models.registry`, which also build them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import FbnetError
from .jsonfile import read_mapping
from .models.registry import BACKBONES, DETECTORS, LOSSES, MODELS


class ConfigError(FbnetError, ValueError):
    """A configuration file or value is wrong; the message names where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _registered(registry: dict, what: str):
    def check(value: str) -> str:
        if value not in registry:
            raise ValueError(f"unknown {what} {value!r} (known: {', '.join(registry)})")
        return value
    return check


def _as_tuple(value):
    """A scalar where a list is expected is a one-element list (``branches: background``)."""
    return value if isinstance(value, (list, tuple)) else (value,)


class DataConfig(_Section):
    #: Dataset directory in the fbnet layout (see docs/data.md); empty = embedded synthetic default.
    root: str = ""
    #: Captions longer than this many tokens are truncated.
    max_words: int = Field(32, ge=1)
    #: Words seen fewer times than this in the training captions map to <unk>.
    min_word_count: int = Field(1, ge=1)
    #: Optional word2vec binary or GloVe text file to initialise the 300-d word embeddings.
    word_vectors: str = ""
    #: Directory of cached block features, shared by every run whose frozen stages match (the
    #: cache is keyed by backbone, detector, levels and their weights); empty = ``<run>/features``.
    feature_cache: str = ""
    #: Views of every training image cached when the backbone's top is fine-tuned, one sampled
    #: per image and step: ``identity`` and ``hflip`` (the canvas mirrored, boxes with it).
    views: tuple[Literal["identity", "hflip"], ...] = ("identity",)

    _views_tuple = field_validator("views", mode="before")(_as_tuple)

    @field_validator("views")
    @classmethod
    def _views_start_with_identity(cls, v):
        if v[:1] != ("identity",) or len(set(v)) != len(v):
            raise ValueError("must start with 'identity' and name each view once (identity, hflip)")
        return v


class BackboneConfig(_Section):
    #: ``alexnet`` (the paper: fc7, 4096-d), ``mobilenet_v2`` (1280-d) or ``resnet18`` (512-d).
    name: str = "mobilenet_v2"
    _known = field_validator("name")(_registered(BACKBONES, "backbone"))
    #: ``""`` random init (seeded), ``"imagenet"`` torchvision's weights API, or a state_dict path.
    weights: str = ""
    #: ``roi``: one backbone pass per image, blocks pooled from the feature map with RoIAlign.
    #: ``crop``: the paper's mode, one backbone pass per cropped and resized block.
    mode: Literal["roi", "crop"] = "roi"
    #: Side of the square canvas every image is resized to before windows are cut.
    image_size: int = Field(224, ge=32)
    #: Side each block is resized to in ``crop`` mode.
    crop_size: int = Field(224, ge=16)
    #: ``roi`` mode: how many of the trunk's last modules are fine-tuned (0 = all frozen; for
    #: MobileNetV2, 2 = the last inverted-residual block and the 1x1 convolution to 1280). Training
    #: then caches the frozen part's activations per image (``fbnet.activations``).
    trainable_blocks: int = Field(0, ge=0)
    #: ``roi`` mode, MobileNetV2: 16 runs its last stride-2 convolution at stride 1 and dilates the
    #: 3x3 convolutions after it by 2 (DeepLab's output stride 16; the same weights), so the top
    #: works on a 14 x 14 map of a 224 px canvas instead of 7 x 7.
    output_stride: Literal[16, 32] = 32

    @model_validator(mode="after")
    def _finetune_needs_roi(self):
        if self.trainable_blocks and (self.mode != "roi" or self.name == "detector"):
            raise ValueError("trainable_blocks > 0 needs mode 'roi' and a torchvision backbone "
                             f"(not {self.name!r} in mode {self.mode!r})")
        if self.output_stride != 32 and (self.mode != "roi" or self.name != "mobilenet_v2"):
            raise ValueError(f"output_stride {self.output_stride} needs backbone 'mobilenet_v2' in mode 'roi' "
                             f"(not {self.name!r} in mode {self.mode!r})")
        return self


class DetectorConfig(_Section):
    #: ``fasterrcnn`` (the paper's choice; torchvision), ``fasterrcnn_light`` (small backbone,
    #: trained on the dataset's boxes in minutes on a CPU), ``yolov3_tiny`` (Darknet files),
    #: ``mobilenet_v2_head`` (a head on MobileNetV2's maps that ``fbnet distill-detector`` trains;
    #: ``weights`` is its file) or ``none`` (whole image as the box).
    name: str = "fasterrcnn_light"
    _known = field_validator("name")(_registered(DETECTORS, "detector"))
    #: Optional detector state_dict path; when empty and the dataset has boxes, it is fine-tuned.
    weights: str = ""
    #: At most J boxes per image (paper: 9) with confidence at least this (paper: 0.1).
    max_boxes: int = Field(9, ge=1)
    score_threshold: float = Field(0.1, ge=0.0, le=1.0)
    #: ``yolov3_tiny``: the network's input side in pixels, a multiple of 32 (0 = the Darknet cfg's
    #: width, 416). The canvas is resized to it, so a side near the canvas (224) costs about
    #: (224/416)^2 of the 416 pixels' convolutions; the boxes change, so train with the size you serve.
    input_size: int = Field(0, ge=0, multiple_of=32)
    #: Fine-tuning budget on the dataset's boxes.
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.01, gt=0.0)


class ModelConfig(_Section):
    #: Which model scores the pairs (see :mod:`fbnet.models.registry`): ``fbnet`` (this paper),
    #: ``scan``, ``dsrln``, ``rgf`` or ``sfe`` (the related region-word models).
    name: str = "fbnet"
    _known = field_validator("name")(_registered(MODELS, "model"))
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    #: Joint embedding size d (paper: 1024).
    embed_dim: int = Field(1024, ge=1)
    #: Word embedding size (paper: 300).
    word_dim: int = Field(300, ge=1)
    #: Levels of the multi-scale scan (paper: 1-3, i.e. 1, 4 and 9 blocks / text windows).
    levels: int = Field(3, ge=1, le=3)
    #: Branches: ``background`` (B-Net) and/or ``foreground`` (F-Net).
    branches: tuple[Literal["background", "foreground"], ...] = ("background", "foreground")
    _branches_tuple = field_validator("branches", mode="before")(_as_tuple)
    #: Inverse softmax temperatures of the stacked cross attention (eqs. 13-15).
    delta1: float = Field(4.0, gt=0.0)
    delta2: float = Field(9.0, gt=0.0)
    #: Region-word models: SCAN's attention direction (``t2i``, ``i2t`` or ``both``), pooling of
    #: the unit relevances (``avg`` or ``lse``) and LogSumExp's lambda_2 (Lee et al. 2018).
    direction: Literal["t2i", "i2t", "both"] = "t2i"
    pooling: Literal["avg", "lse"] = "lse"
    lse_lambda: float = Field(6.0, gt=0.0)
    #: Region-word models: attention heads of their self- and cross-attention steps, and SFE's
    #: number of semantic concepts (external cues).
    heads: int = Field(4, ge=1)
    concepts: int = Field(64, ge=1)
    #: FB-Net: a pooled global branch beside eq. (7)'s six matrices: ``gpo`` (VSE-infinity's
    #: generalized pooling), ``max``, ``mean`` or ``""`` (none; an empty value, as in
    #: ``--set model.global_pool=``, also reads as none). Its weight mu is chosen on dev.
    global_pool: Literal["", "gpo", "max", "mean"] = ""
    _global_pool_none = field_validator("global_pool", mode="before")(lambda v: "" if v is None else v)
    #: The global branch's size augmentation: in training, each block is left out of its pooling
    #: with this probability (:mod:`fbnet.augment`; 0 = off, VSE-infinity: 0.2).
    block_dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _cross_field(self):
        if not self.branches or len(set(self.branches)) != len(self.branches):
            raise ValueError(f"branches must name 'background' and/or 'foreground' once each: {list(self.branches)}")
        if self.block_dropout and not self.global_pool:
            raise ValueError("block_dropout drops blocks from the pooled global branch: set global_pool too")
        if self.embed_dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide embed_dim ({self.embed_dim})")
        if self.backbone.name == "detector" and self.detector.name != "fasterrcnn_light":
            raise ValueError("backbone 'detector' reuses the trunk of detector 'fasterrcnn_light', "
                             f"not of {self.detector.name!r}: use another backbone or that detector")
        return self


class LossConfig(_Section):
    #: ``dsaw`` (eqs. 16-21), ``triplet`` (VSE++ hardest negative, the paper's ablation) or
    #: ``triplet_sum`` (VSE0: the hinges of every negative summed).
    name: str = "dsaw"
    _known = field_validator("name")(_registered(LOSSES, "loss"))
    #: DSAW's scale of the negative pairs' term (eqs. 16-21; paper: 50).
    sigma: float = Field(50.0, gt=0.0)
    #: DSAW's scale of the positive pairs' term (paper: 20).
    theta: float = Field(20.0, gt=0.0)
    #: DSAW's similarity threshold gamma (paper: 0.2).
    gamma: float = Field(0.2, ge=0.0)
    #: Mining slack: a pair is kept when it is within this of the hardest opposite pair.
    epsilon: float = Field(0.1, ge=0.0)
    #: Margin of the triplet alternative.
    margin: float = Field(0.2, ge=0.0)
    #: ``triplet`` only: the first epochs train with ``triplet_sum`` (every negative), then the
    #: hardest negative alone (VSE∞'s warm-up before max violation).
    warmup_epochs: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _warmup_needs_triplet(self):
        if self.warmup_epochs and self.name != "triplet":
            raise ValueError(f"warmup_epochs is for loss 'triplet' (it warms up max violation), not {self.name!r}")
        return self


class TrainConfig(_Section):
    #: The most epochs a run trains for.
    epochs: int = Field(20, ge=1)
    #: Early stopping: stop once this many epochs in a row brought no better validation MAP
    #: (0 = train every epoch). A resumed run counts the epochs it already has.
    patience: int = Field(0, ge=0)
    #: Learning rate x this after each epoch without a better validation MAP (1 = constant).
    plateau_decay: float = Field(1.0, gt=0.0, le=1.0)
    #: Pairs per step (at least 2: the loss needs negatives).
    batch_size: int = Field(128, ge=2)
    #: Learning rate (0 freezes the model: a check of early stopping, or of a loaded checkpoint).
    lr: float = Field(2e-4, ge=0.0)
    #: Adam's weight decay.
    weight_decay: float = Field(0.0, ge=0.0)
    #: Gradient norm clipping (0 = none).
    grad_clip: float = Field(2.0, ge=0.0)
    #: Seed of initialisation, pair order and the synthetic dataset's generation.
    seed: int = 0
    #: Captions per image that the per-epoch validation scores (0 = all). Validation costs
    #: images x captions cross-attention pairs; the fusion search and the final report use all.
    val_captions: int = Field(0, ge=0)
    #: Pairs scored per chunk at evaluation (bounds memory).
    eval_chunk: int = Field(256, ge=1)
    #: Grid for the fusion weights alpha, beta, lambda (paper's sensitivity study).
    fusion_grid: tuple[float, ...] = Field((0.2, 0.4, 0.6, 0.8, 1.0), min_length=1)
    #: Grid for mu, the weight of the pooled global branch (``model.global_pool``) in the fusion.
    global_grid: tuple[float, ...] = Field((0.0, 0.5, 1.0, 2.0), min_length=1)
    _grids_tuple = field_validator("fusion_grid", "global_grid", mode="before")(_as_tuple)

    @field_validator("fusion_grid", "global_grid")
    @classmethod
    def _non_negative(cls, v):
        if any(w < 0 for w in v):
            raise ValueError(f"weights must be >= 0: {list(v)}")
        return v
    #: Fine-tuned backbone top (``model.backbone.trainable_blocks``): its learning rate is
    #: ``lr`` x this, and it stays frozen for the first ``backbone_frozen_epochs`` epochs.
    backbone_lr_scale: float = Field(0.1, gt=0.0)
    backbone_frozen_epochs: int = Field(1, ge=0)
    #: Word dropout: each training caption loses this share of its words at every step (the text
    #: half of VSE-infinity's size augmentation, :mod:`fbnet.augment`; 0 = off, VSE-infinity: 0.2).
    word_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    #: Decay of a moving average of the weights updated after every step (:mod:`fbnet.ema`; 0 =
    #: off). When on, validation, early stopping, ``best.pt`` and all that follows use the average.
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    #: torch threads for training (0 = torch's default).
    num_threads: int = Field(0, ge=0)
    #: Where the epochs run: ``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when a GPU is visible).
    #: Feature extraction and the frozen stages stay on the CPU; CPU runs are deterministic.
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|auto)$")
    #: ``float32``, or ``bfloat16``: the encoders' matrix products in bfloat16 (CPU autocast; about
    #: 2.7x the float32 matmul rate on CPUs with AVX512-BF16 or AMX, and on GPUs), the cross
    #: attention, the loss and evaluation in float32. ``auto``: bfloat16 where the device runs it
    #: natively, else float32 (CPUs without AVX512-BF16 emulate it at about 1/10 of float32's rate).
    precision: Literal["float32", "bfloat16", "auto"] = "float32"
    #: Also write TensorBoard scalars under ``<run>/tensorboard`` (``pip install fbnet[tensorboard]``).
    tensorboard: bool = False


class FBNetConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>") -> "FBNetConfig":
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_first_error(exc)}") from None

    @classmethod
    def load(cls, path: str | Path) -> "FBNetConfig":
        """A config file, validated; a top-level ``base: other.yaml`` key (a path relative to the
        file) reads that file first and lays this one's sections over it, key by key."""
        return cls.from_dict(_read_with_base(Path(str(path)), ()), str(path))

    def with_overrides(self, assignments: tuple[str, ...] | list[str]) -> "FBNetConfig":
        """This config with ``section.key=value`` assignments applied (``fbnet train --set``), each
        value read as YAML (``loss.name=triplet``, ``model.embed_dim=1024``, ``data.views=[identity]``),
        validated together as a file is; a malformed assignment, a path through a value or a bad key
        or value is one :class:`ConfigError` naming the assignments."""
        import yaml

        data = self.to_dict()
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            parts = key.strip().split(".")
            if not sep or not all(parts):
                raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. loss.name=triplet")
            node = data
            for depth, part in enumerate(parts[:-1]):
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    where = ".".join(parts[:depth + 1])
                    raise ConfigError(f"--set {assignment!r}: '{where}' is a value, not a section")
            try:
                node[parts[-1]] = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {assignment!r}: value is not YAML ({exc.problem})") from None
        return type(self).from_dict(data, "--set " + " ".join(assignments)) if assignments else self

    def validate(self) -> None:  # noqa: D102  (values set after loading, e.g. --epochs, checked again)
        type(self).from_dict(self.to_dict(), "config")


def _read_with_base(path: Path, children: tuple[Path, ...]) -> Any:
    """``path``'s mapping over the one its ``base`` key names, recursively (mmdetection's
    ``_base_``, one file deep per level): a mapping merges key by key, any other value replaces.
    A base that is missing, or that names a file already in the chain, is one error naming the
    file whose ``base`` it is."""
    data = read_mapping(path, ConfigError, "config")
    if not isinstance(data, dict) or "base" not in data:
        return data
    name = data.pop("base")
    base = path.parent / str(name)
    if not base.is_file():
        raise ConfigError(f"{path}: 'base': no config file {base}")
    if base.resolve() in children or base.resolve() == path.resolve():
        raise ConfigError(f"{path}: 'base': {name} is already in this file's chain of bases")
    below = _read_with_base(base, children + (path.resolve(),))
    if not isinstance(below, dict):
        raise ConfigError(f"{base}: top level must be a mapping of sections")
    return _laid_over(below, data)


def _laid_over(below: dict[str, Any], above: dict[str, Any]) -> dict[str, Any]:
    """``above``'s keys over ``below``'s: mappings on both sides merge, any other value replaces."""
    merged = dict(below)
    for key, value in above.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _laid_over(merged[key], value) if both_maps else value
    return merged


def _first_error(exc: ValidationError) -> str:
    """One line for pydantic's first error: the dotted key, what is wrong, the value given."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or err["type"] != "literal_error")
    if err["type"] == "extra_forbidden":
        section = FBNetConfig
        for part in err["loc"][:-1]:
            section = section.model_fields[part].annotation
        return f"unknown key '{loc}' (known: {', '.join(sorted(section.model_fields))})"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"'{loc}': {message}{shown}" if loc else f"{message}{shown}"
