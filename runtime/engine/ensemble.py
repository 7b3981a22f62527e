"""Ensembles in the runtime: a bundle of member bundles, scored as the weighted sum of the members'
fused scores (the rule of :mod:`fbnet.ensemble`, ``S = sum_m w_m S_m``).

::

    ENSEMBLE_BUNDLE/
      ensemble.json   members (folder, weight, sha256 of its manifest.json), canvas, source
      member0/        a whole bundle (``fbnet export`` of the first checkpoint)
      member1/        ...
      [trunk.onnx  member<i>_image_encoder.onnx  (and their .ort.onnx)]   the shared trunk

:class:`EnsembleRetriever` has the :class:`~.retriever.Retriever` interface the gallery, search
and serving layers use: a photo is decoded once and encoded by every member; its features are a
:class:`~.features.MemberFeatures` (one set per member; members with the same detector detect
once); :meth:`EnsembleRetriever.score` sums the members' fused scores (:func:`combine`).
Where the bundle has a shared trunk (``fbnet.export.trunk``: the CNN modules several members
compute alike), a photo runs through it once and each sharing member's image encoder starts from
its map: the same features (within float32 rounding) for a fraction of the CNN's cost. It runs on
ONNX Runtime with the members' providers; members on native TensorRT engines, or whose image
encoder is INT8, run their own image encoder. :func:`open_retriever` opens either kind of bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .backends import OnnxRuntimeBackend, select_backend
from .bundle import Bundle, open_bundle, sha256, verify_files
from .features import MemberFeatures, concat_images
from .manifest import BundleError, EnsembleManifest, GraphSpec, SharedTrunk
from .retriever import Retriever, canvas_batches


def combine(scores: list[np.ndarray], weights) -> np.ndarray:
    """``sum_m w_m S_m``: an ensemble's score from its members' (training, evaluation and the
    runtime all combine with this)."""
    return sum(w * s for w, s in zip(weights, scores))


#: the shared trunk's graph in ``ensemble.json`` (``fbnet.export.trunk`` writes it)
TRUNK = "trunk"


def member_folder(i: int) -> str:
    """Where member ``i`` sits in an ensemble bundle, and its gallery in an ensemble gallery."""
    return f"member{i}"


def trunk_output(cut: int) -> str:
    """The shared trunk graph's map after ``cut`` modules (what a member that shares ``cut`` reads)."""
    return f"lower_{cut}"


def shared_graph_name(i: int) -> str:
    """Member ``i``'s image encoder from the shared trunk, in ``ensemble.json`` (file ``<name>.onnx``)."""
    return f"{member_folder(i)}_image_encoder"


@dataclass
class TrunkGraphs:
    """An ensemble bundle's shared-trunk graphs, as a backend opens them (a ``root`` and ``graph``)."""

    root: Path
    record: SharedTrunk

    def graph(self, name: str) -> GraphSpec | None:
        return self.record.graphs.get(name)


@dataclass
class EnsembleBundle:
    root: Path
    manifest: EnsembleManifest
    members: list[Bundle]
    #: sha256 of ensemble.json
    manifest_sha256: str

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.manifest.members]

    @property
    def canvas(self) -> int:
        return self.manifest.canvas

    @cached_property
    def identity(self) -> list[dict[str, str]]:
        return [b.identity for b in self.members]


def is_ensemble_bundle(path: str | Path) -> bool:
    return (Path(path) / EnsembleManifest.FILE).is_file()


def open_ensemble_bundle(path: str | Path, verify: bool = True) -> EnsembleBundle:
    """Open ``ensemble.json`` and every member bundle (each checked as :func:`~.bundle.open_bundle`
    checks one); a member whose manifest.json is not the one recorded is refused, naming it."""
    root = Path(path)
    manifest_path = root / EnsembleManifest.FILE
    manifest = EnsembleManifest.load(manifest_path)
    members = []
    for i, m in enumerate(manifest.members):
        bundle = open_bundle(root / m.bundle, verify)
        if bundle.manifest_sha256 != m.manifest_sha256:
            raise BundleError(f"{root / m.bundle / 'manifest.json'}: not the member {i} bundle {manifest_path} "
                              "records (sha256 differs); re-export the ensemble")
        if bundle.canvas != manifest.canvas:
            raise BundleError(f"{root / m.bundle}: resizes photos to {bundle.canvas} px, the ensemble to "
                              f"{manifest.canvas} ({manifest_path})")
        members.append(bundle)
    if verify and manifest.trunk:
        verify_files(root, manifest.trunk.files, EnsembleManifest.FILE)
    return EnsembleBundle(root, manifest, members, sha256(manifest_path))


class EnsembleRetriever:
    """Several members' retrievers as one (see the module doc). ``backend`` is the first member's
    (every member runs on the same backend kind)."""

    def __init__(self, bundle: EnsembleBundle, members: list[Retriever], share_trunk: bool = True):
        """``share_trunk``: run the bundle's shared trunk where it has one (see the module doc);
        False runs every member's own image encoder (what the shared path is measured against)."""
        self.bundle, self.members = bundle, members
        self.weights = bundle.weights
        self.backend = members[0].backend
        self.batch_size = members[0].batch_size
        record, lead = bundle.manifest.trunk, members[0].backend
        #: member index -> the trunk output its image encoder starts from (members that share)
        self.trunk_inputs: dict[int, str] = {}
        if share_trunk and record and all(isinstance(m.backend, OnnxRuntimeBackend) for m in members):
            self.trunk_inputs = {i: trunk_output(record.modules[member_folder(i)]) for i, m in enumerate(members)
                                 if member_folder(i) in record.modules and not _int8_images(m)}
        self.trunk = OnnxRuntimeBackend(TrunkGraphs(bundle.root, record), lead.providers, lead.threads) \
            if self.trunk_inputs else None

    def lane(self) -> EnsembleRetriever | None:
        lanes = [m.lane() for m in self.members]
        return EnsembleRetriever(self.bundle, lanes, self.trunk is not None) if all(lanes) else None

    def encode_canvases(self, canvases: np.ndarray) -> MemberFeatures:
        """Every member's image features; members with the same detector graph and window layout
        share one detection (the detector is most of an image query's cost), and members that
        share the trunk share its maps."""
        feeds = self.member_feeds(canvases)
        maps = self.trunk_maps(canvases) if self.trunk else {}
        features = []
        for i, m in enumerate(self.members):
            f = feeds[m.boxes_key]
            if i in self.trunk_inputs:
                outs = self.trunk.run(shared_graph_name(i), {
                    "lower": maps[self.trunk_inputs[i]], "block_boxes": f["block_boxes"], "fg_mask": f["fg_mask"]})
                features.append(m.image_features(outs, f["fg_mask"]))
            else:
                features.append(m.encode_feeds(f))
        return MemberFeatures(features)

    def member_feeds(self, canvases: np.ndarray) -> dict[tuple, dict]:
        """The image encoders' feeds per :attr:`~.retriever.Retriever.boxes_key`: one detection for
        the members that share a detector graph and window layout."""
        feeds: dict[tuple, dict] = {}
        for m in self.members:
            if m.boxes_key not in feeds:
                feeds[m.boxes_key] = m.image_encoder_feeds(canvases)
        return feeds

    def trunk_maps(self, canvases: np.ndarray) -> dict[str, np.ndarray]:
        """The shared trunk's maps of ``canvases``, by output name."""
        outputs = [t.name for t in self.bundle.manifest.trunk.graphs[TRUNK].outputs]
        return dict(zip(outputs, self.trunk.run(TRUNK, {"image": canvases.astype(np.float32)})))

    def encode_images(self, paths: list[str | Path]) -> MemberFeatures:
        parts = [self.encode_canvases(c) for c in canvas_batches(paths, self.bundle.canvas, self.batch_size)]
        return MemberFeatures([concat_images([p.members[i] for p in parts]) for i in range(len(self.members))])

    def encode_texts(self, captions: list[str]) -> MemberFeatures:
        return MemberFeatures([m.encode_texts(captions) for m in self.members])

    def score(self, images: MemberFeatures, texts: MemberFeatures) -> np.ndarray:
        """``sum_m w_m S_m`` over the members' fused scores ``(I, C)``."""
        return combine([m.score(i, t) for m, i, t in zip(self.members, images.members, texts.members)], self.weights)


def _int8_images(member: Retriever) -> bool:
    """Whether the member's image encoder was quantized to INT8 (its shared-trunk graph is float32)."""
    quantization = member.bundle.manifest.quantization
    return bool(quantization) and "image_encoder" in quantization.get("graphs", [])


def open_retriever(path: str | Path, backend: str = "auto") -> Retriever | EnsembleRetriever:
    """A bundle's retriever on ``backend``: an ensemble bundle's (every member on that backend) or one
    bundle's."""
    if is_ensemble_bundle(path):
        ensemble = open_ensemble_bundle(path)
        return EnsembleRetriever(ensemble, [Retriever(b, select_backend(b, backend)) for b in ensemble.members])
    bundle = open_bundle(path)
    return Retriever(bundle, select_backend(bundle, backend))
