"""The bundle contract: what ``fbnet export`` writes and every reader loads, as typed records.

* :class:`Manifest` is a bundle's ``manifest.json``: the model's settings, preprocessing, fusion
  weights, each graph's inputs and outputs (:class:`GraphSpec`, :class:`TensorSpec`), TensorRT
  engines, the export check, versions and the sha256 of every file. ``fbnet.export.bundle``
  writes it, the runtime's retriever and backends, Triton serving and ``fbnet.export.triton``
  read it.
* :class:`GalleryMeta` is a gallery's ``gallery.json``; :class:`ShardsMeta` a sharded gallery's
  ``shards.json``.
* :class:`EnsembleManifest` is an ensemble bundle's ``ensemble.json`` (member bundles and their
  score weights); :class:`EnsembleGalleryMeta` an ensemble gallery's ``ensemble-gallery.json``.

Each file carries a ``kind`` and a ``format_version``, checked on load: a missing, foreign or
other-version file is refused with one line that names it. Fields a reader does not know are kept
(:attr:`extra`) and written back unchanged.

A gallery records the *identity* of the encoders that made its vectors (:func:`identity`): the
sha256 of the graphs that encode images and captions (``detector``, ``image_encoder``,
``text_encoder``), of the vocabulary, and of the manifest's model settings, preprocessing and
fusion weights. Not the export time, the export check, the engines or the library versions: a
re-export of the same checkpoint, or TensorRT engines added later by ``fbnet export
--engines-only``, opens the same galleries, and a bundle of another model does not.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from fbnet import FORMAT_VERSION
from fbnet.atomic import atomic_write_text
from fbnet.errors import FbnetError
from fbnet.jsonfile import read_json

BUNDLE_KIND = "fbnet-bundle"
GALLERY_KIND = "fbnet-gallery"
SHARDS_KIND = "fbnet-gallery-shards"
ENSEMBLE_BUNDLE_KIND = "fbnet-ensemble-bundle"
ENSEMBLE_GALLERY_KIND = "fbnet-ensemble-gallery"
#: ensemble.json and ensemble-gallery.json
ENSEMBLE_FORMAT = 1
#: gallery.json and shards.json: 2 records the encoders' identity; 1 (no ``format_version`` in the
#: file) recorded the sha256 of the whole manifest.json, and is still read.
GALLERY_FORMAT = 2
LEGACY_GALLERY_FORMAT = 1
#: The graphs whose outputs a gallery stores (the scorer and reranker only read them).
ENCODER_GRAPHS = ("detector", "image_encoder", "text_encoder")


class BundleError(FbnetError, ValueError):
    """A bundle is missing, altered or from another format version; the message names the file."""

    http_status = 500  # the server's own files


class GalleryError(FbnetError, ValueError):
    """A gallery is missing, incomplete or made with another bundle."""

    http_status = 500  # the server's own files


class _Record:
    """A JSON file of the contract: :meth:`load` checks its kind and format version and parses it,
    :meth:`save` writes it atomically."""

    FILE: str
    KIND: str
    #: what the file is, in messages
    WHAT: str
    ERROR: type[Exception]
    #: format versions this fbnet reads, and the version of a file that records none (None: an error)
    VERSIONS: tuple[int, ...]
    UNVERSIONED: int | None = None

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = ""):
        """The record of a dataclass with an ``extra`` field (the keys this fbnet does not know);
        nested records are converted in its ``__post_init__``."""
        path = path or cls.FILE
        known, extra = cls._checked(data, path)
        try:
            return cls(**known, extra=extra)
        except (TypeError, KeyError) as exc:  # e.g. an entry with other fields
            raise cls.ERROR(f"{path}: malformed {cls.WHAT} ({exc})") from None

    def to_dict(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        return _without_none({"kind": self.KIND, **data}, extra)

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        return cls.from_dict(read_json(path, cls.ERROR), path)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def _checked(cls, data, path: str | Path) -> tuple[dict, dict]:
        """``data`` split into (this record's fields, with ``format_version``; the fields it does not
        know), after checking its kind, format version and required fields."""
        found = data.get("kind") if isinstance(data, dict) else None
        if found != cls.KIND:
            raise cls.ERROR(f"{path}: not an fbnet {cls.WHAT} "
                            f"({f'kind {found!r}' if found else 'no kind'}, expected {cls.KIND!r})")
        version = data.get("format_version", cls.UNVERSIONED)
        if version is None:
            raise cls.ERROR(f"{path}: no format_version; is it a {cls.WHAT} written by fbnet?")
        if version not in cls.VERSIONS:
            raise cls.ERROR(f"{path}: {cls.WHAT} format {version}, this fbnet reads "
                            f"{', '.join(map(str, cls.VERSIONS))}; "
                            f"{'re-export' if cls is Manifest else 're-index'} with this fbnet version")
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [f.name for f in fields(cls)
                   if f.name in names and f.default is MISSING and f.default_factory is MISSING and f.name not in data]
        if missing:
            raise cls.ERROR(f"{path}: missing {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in names}
        hints = typing.get_type_hints(cls)
        wrong = [k for k, v in known.items() if not _conforms(v, hints[k])]
        if wrong:
            raise cls.ERROR(f"{path}: malformed {cls.WHAT}: " + "; ".join(
                f"{k} is {json.dumps(known[k])[:60]}, not {_describe(hints[k])}" for k in wrong))
        return {**known, "format_version": version}, {k: v for k, v in data.items() if k not in names | {"kind"}}


def _conforms(value, hint) -> bool:
    """Whether a JSON value fits a field's type (records written as mappings)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list or hint is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value if args)
    if origin is tuple:
        return isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1])
                                               for k, v in value.items() if args)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    name = getattr(origin or hint, "__name__", str(hint))
    return f"{name}[{', '.join(_describe(a) for a in args)}]" if args else name


def _without_none(known: dict, extra: dict) -> dict:
    return {**{k: v for k, v in known.items() if v is not None}, **extra}


# -- manifest.json -------------------------------------------------------------------------------
@dataclass
class TensorSpec:
    """A graph input or output: name, numpy dtype name, shape (an int per static axis, a name per
    dynamic one)."""

    name: str
    dtype: str
    shape: list

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], list(d["shape"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class OptimizedGraph:
    """ONNX Runtime's saved optimised form of a graph (``<graph>.ort.onnx``) and what it was made from."""

    file: str
    source: str
    level: str
    onnxruntime: str

    def to_dict(self) -> dict:
        return {"file": self.file, "source": self.source, "level": self.level, "onnxruntime": self.onnxruntime}


@dataclass
class GraphSpec:
    """One graph of the bundle: its file, inputs, outputs and dynamic axes; the optimised form
    ONNX Runtime saved at export; for an INT8 graph, the float32 file it was quantized from."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict = field(default_factory=dict)
    ort_optimized: OptimizedGraph | None = None
    float_file: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        opt = d.get("ort_optimized")
        return cls(d["file"], [TensorSpec.from_dict(t) for t in d["inputs"]],
                   [TensorSpec.from_dict(t) for t in d["outputs"]], dict(d.get("dynamic_axes", {})),
                   OptimizedGraph(**opt) if opt else None, d.get("float_file"))

    def to_dict(self) -> dict:
        return _without_none({"file": self.file, "inputs": [t.to_dict() for t in self.inputs],
                            "outputs": [t.to_dict() for t in self.outputs], "dynamic_axes": self.dynamic_axes,
                            "ort_optimized": self.ort_optimized.to_dict() if self.ort_optimized else None,
                            "float_file": self.float_file}, {})

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass
class ModelSpec:
    """The exported model's settings the runtime needs (``model`` in the manifest)."""

    name: str
    levels: int
    branches: list[str]
    embed_dim: int
    max_boxes: int
    score_threshold: float
    max_words: int
    keys: list[str]
    #: keys whose text units are words (region-word models), padded to ``max_words``
    word_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Preprocess:
    """How an image becomes the graphs' input (``preprocess``): the canvas side and a record of the rest."""

    canvas: int
    resize: str = "bilinear (PIL)"
    channels: str = "RGB, CHW"
    scale: str = "1/255"
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)
    normalisation: str = "inside image_encoder.onnx and detector.onnx"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Engines:
    """TensorRT engines: why there are none, or ``built`` and the engine file per graph."""

    status: str = "not requested"
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"status": self.status, "files": dict(self.files)}


@dataclass
class Manifest(_Record):
    """A bundle's ``manifest.json`` (see the module doc)."""

    model: ModelSpec
    preprocess: Preprocess
    graphs: dict[str, GraphSpec]
    #: sha256 of every bundle file but manifest.json
    files: dict[str, str]
    fusion: dict[str, float] = field(default_factory=dict)
    created: str = ""
    precision: str = ""
    opset: int | None = None
    engines: Engines = field(default_factory=Engines)
    export_check: dict = field(default_factory=dict)
    validation_metrics: dict | None = None
    source_checkpoint: dict | None = None
    versions: dict = field(default_factory=dict)
    #: ``fbnet export --int8``: which graphs are INT8 and how they were calibrated
    quantization: dict | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    FILE, KIND, WHAT, ERROR, VERSIONS = "manifest.json", BUNDLE_KIND, "bundle manifest", BundleError, (FORMAT_VERSION,)

    #: the graphs every bundle has (``detector`` and ``reranker`` are optional)
    REQUIRED_GRAPHS = ("image_encoder", "text_encoder", "scorer")

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = FILE) -> Manifest:
        known, extra = cls._checked(data, path)
        missing = [g for g in cls.REQUIRED_GRAPHS if g not in known["graphs"]]
        if missing:
            raise BundleError(f"{path}: malformed manifest: no {', '.join(missing)} graph")
        try:
            return cls(**{**known, "model": ModelSpec(**known["model"]), "preprocess": Preprocess(**known["preprocess"]),
                          "graphs": {g: GraphSpec.from_dict(s) for g, s in known["graphs"].items()},
                          "engines": Engines(**known.get("engines", {}))}, extra=extra)
        except (KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None

    def to_dict(self) -> dict:
        known = {"kind": self.KIND, "format_version": self.format_version, "created": self.created,
                 "precision": self.precision, "opset": self.opset, "model": self.model.to_dict(),
                 "preprocess": self.preprocess.to_dict(), "fusion": self.fusion,
                 "graphs": {g: s.to_dict() for g, s in self.graphs.items()}, "engines": self.engines.to_dict(),
                 "export_check": self.export_check, "validation_metrics": self.validation_metrics,
                 "source_checkpoint": self.source_checkpoint, "versions": self.versions,
                 "quantization": self.quantization, "files": self.files}
        return {**_without_none(known, self.extra), "validation_metrics": self.validation_metrics}

    @property
    def canvas(self) -> int:
        return int(self.preprocess.canvas)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def identity(manifest: Manifest) -> dict[str, str]:
    """What determines a gallery's vectors, as ``part -> sha256``: the encoder graphs' files and the
    vocabulary (their sha256 from the manifest, verified when the bundle opens), and the model
    settings, preprocessing and fusion weights (sha256 of their JSON)."""
    out = {g: manifest.files.get(spec.file, "") for g, spec in manifest.graphs.items() if g in ENCODER_GRAPHS}
    out["vocab"] = manifest.files.get("vocab.json", "")
    out.update(model=_digest(manifest.model.to_dict()), preprocess=_digest(manifest.preprocess.to_dict()),
               fusion=_digest(manifest.fusion))
    return dict(sorted(out.items()))


# -- gallery.json, shards.json --------------------------------------------------------------------
@dataclass(kw_only=True)
class _GalleryRecord(_Record):
    """gallery.json and shards.json: format 1 or 2, bound to the encoders that made them."""

    #: the encoders' identity (:func:`identity`); None in a format-1 file, which has :attr:`bundle`
    encoders: dict[str, str] | None = None
    #: format 1: sha256 of the manifest.json that made the gallery
    bundle: str | None = None
    format_version: int = GALLERY_FORMAT
    extra: dict = field(default_factory=dict)

    ERROR, VERSIONS, UNVERSIONED = GalleryError, (LEGACY_GALLERY_FORMAT, GALLERY_FORMAT), LEGACY_GALLERY_FORMAT

    @classmethod
    def _checked(cls, data, path: str | Path) -> tuple[dict, dict]:
        known, extra = super()._checked(data, path)
        if (known["format_version"] == GALLERY_FORMAT) != (known.get("encoders") is not None):
            raise GalleryError(f"{path}: {cls.WHAT} format {known['format_version']} "
                               + ("records no encoders" if known.get("encoders") is None else "with an encoders record"))
        return known, extra

    def differs_from(self, bundle_identity: dict[str, str], manifest_sha256: str) -> list[str]:
        """The parts of the recorded encoders' identity that differ from a bundle's (empty: the
        bundle's encoders made this); a format-1 file names ``manifest.json`` unless it recorded
        exactly that bundle's."""
        if self.encoders is None:
            return [] if self.bundle == manifest_sha256 else [Manifest.FILE]
        return sorted(k for k in set(self.encoders) | set(bundle_identity)
                      if self.encoders.get(k) != bundle_identity.get(k))

    def check_bundle(self, bundle_identity: dict[str, str], manifest_sha256: str, path: Path,
                     bundle_root: Path) -> None:
        """Refuse (:class:`GalleryError`, naming what differs) a bundle whose encoders did not make this."""
        differ = self.differs_from(bundle_identity, manifest_sha256)
        if differ == [Manifest.FILE]:
            raise GalleryError(f"{path}: made with another bundle (an older {self.WHAT}, bound to the whole "
                               f"manifest.json that made it, not {bundle_root / Manifest.FILE}); "
                               f"re-run `fbnet-serve-cli index` with this bundle")
        if differ:
            raise GalleryError(f"{path}: made with another model: its {', '.join(differ)} "
                               f"{'differs' if len(differ) == 1 else 'differ'} from {bundle_root}'s; "
                               f"re-run `fbnet-serve-cli index` with this bundle")


@dataclass
class GalleryMeta(_GalleryRecord):
    """A gallery's ``gallery.json``; also the resumable plan of an index job (then with the item
    names listed in :attr:`images` / :attr:`captions` and no counts)."""

    keys: list[str]
    dtype: str
    store: str
    #: sha256 of the item names (tells a finished shard holds exactly the items asked for)
    items_sha256: str | None = None
    n_images: int | None = None
    n_captions: int | None = None
    #: folder of the item-name line files; None when the names are listed here
    items: str | None = None
    images: list[str] | None = None
    captions: list[str] | None = None
    first_stage: dict[str, str] = field(default_factory=dict)
    #: the key whose vectors the first stage ranks; "" in galleries indexed before it was recorded
    #: (they ranked B1, else F1: :func:`fbnet.runtime.gallery.first_stage.recorded_first_stage_key`)
    first_stage_key: str = ""
    coded: dict = field(default_factory=dict)

    FILE, KIND, WHAT = "gallery.json", GALLERY_KIND, "gallery"


@dataclass
class ShardEntry:
    """One shard of ``shards.json``: its folder (relative) and item counts."""

    path: str
    images: int
    captions: int


@dataclass
class ShardsMeta(_GalleryRecord):
    """A sharded gallery's ``shards.json``: the shards in order and their item counts."""

    shards: list[ShardEntry]
    shard_size: int | None = None

    FILE, KIND, WHAT = "shards.json", SHARDS_KIND, "shard list"

    def __post_init__(self):
        self.shards = [s if isinstance(s, ShardEntry) else ShardEntry(**s) for s in self.shards]


# -- ensembles ----------------------------------------------------------------------------------
@dataclass
class EnsembleMember:
    """One member of an ensemble bundle: its bundle folder (relative), score weight and the sha256
    of its manifest.json."""

    bundle: str
    weight: float
    manifest_sha256: str


@dataclass
class SharedTrunk:
    """An ensemble bundle's shared trunk (``fbnet export`` of an ensemble, :mod:`fbnet.export.trunk`):
    the ``trunk`` graph runs the CNN modules several members compute alike once per photo, with a
    map after each sharing member's ``modules[<member folder>]`` modules, and
    ``graphs[<member folder>_image_encoder]`` is that member's image encoder from its map.
    ``files``: sha256 of every file listed."""

    graphs: dict[str, GraphSpec]
    files: dict[str, str]
    #: how many leading modules each sharing member shares (the trunk map it reads)
    modules: dict[str, int]
    #: the member whose trunk the graph runs
    reference: str = ""
    #: largest differences of each graph to PyTorch at export
    export_check: dict = field(default_factory=dict)

    def __post_init__(self):
        self.graphs = {g: s if isinstance(s, GraphSpec) else GraphSpec.from_dict(s) for g, s in self.graphs.items()}


@dataclass(kw_only=True)
class EnsembleManifest(_Record):
    """An ensemble bundle's ``ensemble.json``: member bundles (each a whole bundle in its folder) and
    the weights of their fused scores, ``S = sum_m w_m S_m``. The first member's pooled vectors are
    the first stage of two-stage search."""

    members: list[EnsembleMember]
    canvas: int
    created: str = ""
    #: the ensemble file exported (path, sha256) and its members' validation metrics
    source: dict = field(default_factory=dict)
    #: the CNN pass members share (None: each member's image encoder runs its own)
    trunk: SharedTrunk | None = None
    format_version: int = ENSEMBLE_FORMAT
    extra: dict = field(default_factory=dict)

    FILE, KIND, WHAT, ERROR, VERSIONS = "ensemble.json", ENSEMBLE_BUNDLE_KIND, "ensemble bundle", BundleError, \
        (ENSEMBLE_FORMAT,)

    def __post_init__(self):
        self.members = [m if isinstance(m, EnsembleMember) else EnsembleMember(**m) for m in self.members]
        if isinstance(self.trunk, dict):
            self.trunk = SharedTrunk(**self.trunk)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = FILE) -> EnsembleManifest:
        record = super().from_dict(data, path)
        if not record.members or any(m.weight <= 0 for m in record.members):
            raise BundleError(f"{path}: members must be a non-empty list with positive weights")
        return record


@dataclass(kw_only=True)
class EnsembleGalleryMeta(_Record):
    """An ensemble gallery's ``ensemble-gallery.json``: one gallery per member bundle, in its
    folder, each bound to that member's encoders by its own ``gallery.json``."""

    members: list[str]
    format_version: int = ENSEMBLE_FORMAT
    extra: dict = field(default_factory=dict)

    FILE, KIND, WHAT, ERROR, VERSIONS = "ensemble-gallery.json", ENSEMBLE_GALLERY_KIND, "ensemble gallery", \
        GalleryError, (ENSEMBLE_FORMAT,)
