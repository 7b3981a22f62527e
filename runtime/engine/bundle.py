"""Opening an exported bundle: manifest (format version checked), sha256 of every file, vocabulary."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from fbnet.vocab import Vocabulary

from .manifest import BundleError, GraphSpec, Manifest, ModelSpec, identity

__all__ = ["Bundle", "BundleError", "open_bundle", "sha256", "verify_files"]


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    vocab: Vocabulary
    #: sha256 of manifest.json (what galleries of format 1 recorded to prove which bundle made them)
    manifest_sha256: str

    @property
    def model(self) -> ModelSpec:
        return self.manifest.model

    @property
    def canvas(self) -> int:
        return self.manifest.canvas

    @property
    def keys(self) -> list[str]:
        return list(self.model.keys)

    def graph(self, name: str) -> GraphSpec | None:
        return self.manifest.graphs.get(name)

    @cached_property
    def identity(self) -> dict[str, str]:
        """What a gallery records to prove these encoders made it (:func:`~.manifest.identity`)."""
        return identity(self.manifest)


def sha256(path: Path) -> str:
    """Hex sha256 of a file (what manifests record for every bundle file)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(root: Path, files: dict[str, str], record: str) -> None:
    """Every file ``record`` lists (name -> sha256, relative to ``root``) is there and unaltered, else
    one :class:`BundleError` naming the file."""
    for name, digest in files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle (listed in {record})")
        if sha256(f) != digest:
            raise BundleError(f"{f}: altered since export (sha256 differs from {record})")


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    root = Path(path)
    manifest_path = root / Manifest.FILE
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; is {root} a bundle written by `fbnet export`?")
    manifest = Manifest.load(manifest_path)
    if verify:
        verify_files(root, manifest.files, Manifest.FILE)
    try:
        vocab = Vocabulary.load(root / "vocab.json")
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise BundleError(f"{root / 'vocab.json'}: unreadable vocabulary ({exc})") from None
    return Bundle(root, manifest, vocab, sha256(manifest_path))
