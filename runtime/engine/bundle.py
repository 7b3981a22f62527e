"""Opening an exported bundle: manifest, format version, sha256 of every file, vocabulary."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fbnet import FORMAT_VERSION
from fbnet.jsonfile import read_json
from fbnet.vocab import Vocabulary


class BundleError(ValueError):
    """A bundle is missing, altered or from another format version; the message names the file."""


@dataclass
class Bundle:
    root: Path
    manifest: dict
    vocab: Vocabulary
    #: sha256 of manifest.json: what a gallery records to prove which bundle made it.
    fingerprint: str

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def canvas(self) -> int:
        return int(self.manifest["preprocess"]["canvas"])

    @property
    def keys(self) -> list[str]:
        return list(self.model["keys"])

    def graph(self, name: str) -> dict | None:
        return self.manifest["graphs"].get(name)


def sha256(path: Path) -> str:
    """Hex sha256 of a file (what manifests record for every bundle file)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; is {root} a bundle written by `fbnet export`?")
    manifest = read_json(manifest_path, BundleError)
    if manifest.get("kind") != "fbnet-bundle":
        raise BundleError(f"{manifest_path}: not an fbnet bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: bundle format {manifest.get('format_version')}, this runtime reads "
                          f"{FORMAT_VERSION}; re-export with this fbnet version")
    if verify:
        for name, digest in manifest["files"].items():
            f = root / name
            if not f.is_file():
                raise BundleError(f"{f}: missing from the bundle (listed in manifest.json)")
            if sha256(f) != digest:
                raise BundleError(f"{f}: altered since export (sha256 differs from manifest.json)")
    try:
        vocab = Vocabulary.load(root / "vocab.json")
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise BundleError(f"{root / 'vocab.json'}: unreadable vocabulary ({exc})") from None
    return Bundle(root, manifest, vocab, sha256(manifest_path))
