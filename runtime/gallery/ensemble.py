"""Ensemble galleries: one gallery per member bundle, searched as one.

::

    GALLERY/
      ensemble-gallery.json   the member folders, in the ensemble bundle's order (EnsembleGalleryMeta)
      member0/                a gallery (one directory or shards) made by member 0's bundle
      member1/ ...

Each member's gallery is built by the usual index job with that member's encoders, and records
their identity in its own ``gallery.json``, so a member bundle re-exported from another checkpoint
is refused as for one model. Item ``i`` is the same image (caption) in every member's gallery; its
features are a :class:`~fbnet.runtime.engine.features.MemberFeatures`, and the first member's
first stage ranks the shortlist. ``ensemble-gallery.json`` is written last: an interrupted job
resumes at the first member (or shard) not yet built.
"""

from __future__ import annotations

from pathlib import Path

from ..engine.ensemble import EnsembleBundle, member_folder
from ..engine.features import MemberFeatures
from ..engine.manifest import EnsembleGalleryMeta, GalleryError, GalleryMeta, ShardsMeta
from .shards import open_model_gallery


class EnsembleGallery:
    """The :class:`~fbnet.runtime.gallery.gallery.Gallery` interface over the members' galleries."""

    def __init__(self, root: str | Path, bundle: EnsembleBundle):
        root = Path(root)
        path = root / EnsembleGalleryMeta.FILE
        meta = EnsembleGalleryMeta.load(path)
        if len(meta.members) != len(bundle.members):
            raise GalleryError(f"{path}: {len(meta.members)} member galleries for an ensemble of "
                               f"{len(bundle.members)} ({bundle.root}); re-run `fbnet-serve-cli index` with it")
        self.root, self.meta = root, meta
        self.members = [open_model_gallery(root / name, b) for name, b in zip(meta.members, bundle.members)]
        lead = self.members[0]
        for name, g in zip(meta.members[1:], self.members[1:]):
            if list(g.images) != list(lead.images) or list(g.captions) != list(lead.captions):
                raise GalleryError(f"{root / name}: holds other items than {root / meta.members[0]} "
                                   "(member galleries from different index jobs?)")
        self.images, self.captions = lead.images, lead.captions
        self.image_features = None if lead.image_features is None else \
            MemberFeatures([g.image_features for g in self.members])
        self.text_features = None if lead.text_features is None else \
            MemberFeatures([g.text_features for g in self.members])

    def first_stage(self, side: str):
        """The first member's saved first stage for ``side`` (None: searched exactly)."""
        return self.members[0].first_stage(side)

    @property
    def first_stage_key(self) -> str:
        """The first member's first-stage key."""
        return self.members[0].first_stage_key


def build_ensemble_gallery(bundle: EnsembleBundle, out: str | Path, build_member) -> Path:
    """Index an ensemble gallery into ``out``: ``build_member(member_bundle, folder)`` runs the index
    job of one member (:func:`~.build.build_gallery`, :func:`~.shards.build_sharded`, or on Ray); a
    member whose gallery is finished is kept on resume."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [member_folder(i) for i in range(len(bundle.members))]
    for name, member in zip(names, bundle.members):
        if not any((out / name / f).is_file() for f in (GalleryMeta.FILE, ShardsMeta.FILE)):
            build_member(member, out / name)
    EnsembleGalleryMeta(members=names).save(out / EnsembleGalleryMeta.FILE)
    return out
