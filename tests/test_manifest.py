"""The bundle contract (manifest.json, gallery.json, shards.json) and what binds a gallery to a model."""

import json
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner

from fbnet.runtime.engine.bundle import BundleError, open_bundle, sha256
from fbnet.runtime.engine.manifest import (GALLERY_FORMAT, Engines, GalleryError, GalleryMeta, GraphSpec, Manifest,
                                           ModelSpec, Preprocess, ShardEntry, ShardsMeta, TensorSpec, identity)


def small_manifest() -> Manifest:
    graph = lambda name: GraphSpec(f"{name}.onnx", [TensorSpec("x", "float32", ["n", 3])],  # noqa: E731
                                   [TensorSpec("y", "float32", ["n", 2])])
    names = ("detector", "image_encoder", "text_encoder", "scorer")
    return Manifest(model=ModelSpec("fbnet", 3, ["B", "F"], 8, 4, 0.1, 12, ["B1", "F1"]),
                    preprocess=Preprocess(canvas=64, mean=[0.5] * 3, std=[0.25] * 3),
                    graphs={n: graph(n) for n in names}, fusion={"alpha": 1.0, "beta": 1.0, "lam": 1.0},
                    files={**{f"{n}.onnx": n * 4 for n in names}, "vocab.json": "v" * 64}, created="then")


@pytest.mark.parametrize("data, message", [
    ({}, "not an fbnet bundle manifest (no kind, expected 'fbnet-bundle')"),
    ({"kind": "fbnet-checkpoint"}, "not an fbnet bundle manifest (kind 'fbnet-checkpoint'"),
    ({"kind": "fbnet-bundle"}, "no format_version"),
    ({"kind": "fbnet-bundle", "format_version": 99}, "bundle manifest format 99, this fbnet reads 1; re-export"),
    ({"kind": "fbnet-bundle", "format_version": 1}, "missing model, preprocess, graphs, files"),
    ([1, 2], "not an fbnet bundle manifest"),
])
def test_a_foreign_or_other_version_manifest_is_named_in_one_line(tmp_path, data, message):
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as err:
        open_bundle(tmp_path)
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'manifest.json'}: ") and message in text and "\n" not in text


def test_records_round_trip_and_keep_unknown_fields(tmp_path):
    m = small_manifest()
    m.extra["added_later"] = {"by": "a newer fbnet"}
    m.save(tmp_path / "manifest.json")
    again = Manifest.load(tmp_path / "manifest.json")
    assert again == m and again.to_dict()["added_later"] == {"by": "a newer fbnet"}
    assert again.graphs["scorer"].input("x").shape == ["n", 3] and again.graphs["scorer"].input("z") is None
    meta = GalleryMeta(["B1"], "float32", "sq8", "i" * 64, encoders=identity(m), n_images=3, n_captions=0,
                       items="items", first_stage={"images": "Flat"}, extra={"box_counts": "flickr8k"})
    meta.save(tmp_path / "gallery.json")
    assert GalleryMeta.load(tmp_path / "gallery.json") == meta
    assert json.loads((tmp_path / "gallery.json").read_text())["format_version"] == GALLERY_FORMAT
    shards = ShardsMeta([ShardEntry("shard-00000", 3, 0)], 3, encoders=identity(m))
    shards.save(tmp_path / "shards.json")
    assert ShardsMeta.load(tmp_path / "shards.json") == shards


def test_gallery_files_are_checked_for_kind_and_version(tmp_path):
    path = tmp_path / "gallery.json"
    base = {"kind": "fbnet-gallery", "keys": ["B1"], "dtype": "float32", "store": "float32"}
    for data, message in (({**base, "kind": "fbnet-bundle"}, "not an fbnet gallery (kind 'fbnet-bundle'"),
                          ({**base, "format_version": 7, "encoders": {}}, "gallery format 7, this fbnet reads 1, 2; re-index"),
                          ({**base, "format_version": 2}, "gallery format 2 records no encoders"),
                          ({"kind": "fbnet-gallery", "format_version": 2, "encoders": {}, "store": "sq8"},
                           "missing keys, dtype")):
        path.write_text(json.dumps(data))
        with pytest.raises(GalleryError) as err:
            GalleryMeta.load(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    path.write_text(json.dumps({**base, "bundle": "m" * 64}))  # format 1: no format_version, the manifest's sha256
    old = GalleryMeta.load(path)
    assert old.format_version == 1 and old.encoders is None
    assert old.differs_from({}, "m" * 64) == [] and old.differs_from({}, "x" * 64) == ["manifest.json"]


def test_the_identity_leaves_out_what_does_not_change_a_gallerys_vectors():
    m = small_manifest()
    same = replace(m, created="now", precision="float32 graphs, float16 TensorRT engines", opset=18,
                   engines=Engines("built", {"scorer": "scorer.trt10.sm90.engine"}), export_check={"scorer": {}},
                   versions={"torch": "9"}, validation_metrics={"map": 0.5},
                   files={**m.files, "scorer.onnx": "other", "timing.cache": "c"})
    assert identity(same) == identity(m)
    for changed, part in ((replace(m, files={**m.files, "text_encoder.onnx": "t2"}), "text_encoder"),
                          (replace(m, files={**m.files, "detector.onnx": "d2"}), "detector"),
                          (replace(m, files={**m.files, "vocab.json": "w"}), "vocab"),
                          (replace(m, fusion={**m.fusion, "lam": 0.5}), "fusion"),
                          (replace(m, model=replace(m.model, max_boxes=9)), "model"),
                          (replace(m, preprocess=replace(m.preprocess, canvas=128)), "preprocess")):
        differ = GalleryMeta(["B1"], "float32", "float32", encoders=identity(m)).differs_from(identity(changed), "")
        assert differ == [part]


def test_the_exported_manifest_reads_back_exactly(bundle):
    data = json.loads((bundle / "manifest.json").read_text())
    assert Manifest.load(bundle / "manifest.json").to_dict() == data


def _different_text_encoder(src, out):
    """A copy of the bundle ``src`` whose text encoder has other weights (another model)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, out)
    graph = onnx.load(str(out / "text_encoder.onnx"))
    init = next(i for i in graph.graph.initializer if numpy_helper.to_array(i).dtype == np.float32)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(graph, str(out / "text_encoder.onnx"))
    manifest = Manifest.load(out / "manifest.json")
    manifest.files["text_encoder.onnx"] = sha256(out / "text_encoder.onnx")
    manifest.save(out / "manifest.json")
    return out


def test_a_gallery_opens_with_any_export_of_its_model_and_no_other(trained, bundle, served, gallery_inputs, tmp_path):
    """Re-exporting the checkpoint, or adding engines, keeps its galleries (plain and sharded); a bundle
    whose encoders differ is refused, naming what differs; a gallery from before (bound to its whole
    manifest.json) still opens with its own bundle."""
    from fbnet.cli import main
    from fbnet.runtime.gallery.build import list_images, read_captions
    from fbnet.runtime.gallery.gallery import Gallery
    from fbnet.runtime.gallery import open_gallery
    from fbnet.runtime.gallery.shards import build_sharded, plan_shards

    retriever, gallery, root = served
    first = retriever.bundle
    res = CliRunner().invoke(main, ["export", str(trained / "run" / "best.pt"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    again = open_bundle(tmp_path / "again")
    assert again.manifest_sha256 != first.manifest_sha256 and again.identity == first.identity
    assert len(Gallery(root, again).images) == len(gallery.images)

    engines = tmp_path / "engines"  # `fbnet export --engines-only` on a GPU host adds engines
    shutil.copytree(tmp_path / "again", engines)
    manifest = Manifest.load(engines / "manifest.json")
    manifest.engines = Engines("built", {"scorer": "scorer.trt10.13.sm90.engine"})
    manifest.save(engines / "manifest.json")
    Gallery(root, open_bundle(engines))

    images, captions = list_images(gallery_inputs / "images"), read_captions(gallery_inputs / "captions.txt")
    build_sharded(retriever, images, captions, tmp_path / "sharded", 5)
    assert len(open_gallery(tmp_path / "sharded", again).images) == len(images)
    assert all(job.done for job in plan_shards(again, images, captions, tmp_path / "sharded", 5))  # nothing to redo

    other = open_bundle(_different_text_encoder(tmp_path / "again", tmp_path / "other"))
    with pytest.raises(GalleryError, match=r"gallery\.json: made with another model: its text_encoder differs"):
        Gallery(root, other)
    with pytest.raises(GalleryError, match=r"shards\.json: made with another model: its text_encoder differs"):
        open_gallery(tmp_path / "sharded", other)
    assert not any(job.done for job in plan_shards(other, images, captions, tmp_path / "sharded", 5))

    old = tmp_path / "old"  # gallery.json of format 1: the sha256 of the manifest.json that made it
    shutil.copytree(root, old)
    meta = json.loads((old / "gallery.json").read_text())
    for key in ("format_version", "encoders"):
        meta.pop(key)
    (old / "gallery.json").write_text(json.dumps({**meta, "bundle": first.manifest_sha256}))
    assert len(Gallery(old, first).images) == len(gallery.images)
    with pytest.raises(GalleryError, match=r"gallery\.json: made with another bundle \(an older gallery"):
        Gallery(old, again)
