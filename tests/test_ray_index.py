"""Indexing on Ray: a local cluster started by the test (2 CPUs), the same gallery as
single-process indexing, and resume after an interrupted shard."""

import shutil

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fbnet[ray]')")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_index_equals_single_process_and_resumes(ray_cluster, bundle, gallery_inputs, tmp_path):
    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery.build import build_gallery, list_images, read_captions
    from fbnet.runtime.gallery.ray_index import index_on_ray
    from fbnet.runtime.gallery import open_gallery

    b = open_bundle(bundle)
    images, captions = list_images(gallery_inputs / "images"), read_captions(gallery_inputs / "captions.txt")
    single = open_gallery(build_gallery(Retriever(b, OnnxRuntimeBackend(b)), images, captions, tmp_path / "one"), b)
    out = tmp_path / "ray"
    index_on_ray(bundle, images, captions, out, shard_size=5, workers=2)
    sharded = open_gallery(out, b)
    assert len(sharded.shards) == 3 and list(sharded.images) == list(single.images)
    for k in b.keys:
        np.testing.assert_allclose(np.asarray(sharded.image_features.blocks[k]),
                                   np.asarray(single.image_features.blocks[k]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(sharded.text_features.windows[k]),
                                   np.asarray(single.text_features.windows[k]), atol=1e-5)
    # an interrupted job: shard 1 lost mid-way (its .partial left behind), no shards.json yet
    kept = (out / "shard-00000" / "gallery.json").stat().st_mtime_ns
    shutil.move(out / "shard-00001", out / "shard-00001.partial")
    (out / "shards.json").unlink()
    logs = []
    index_on_ray(bundle, images, captions, out, shard_size=5, workers=2, log=logs.append)
    assert "2 already built; 1 to build" in logs[0]
    assert (out / "shard-00000" / "gallery.json").stat().st_mtime_ns == kept
    assert len(open_gallery(out, b).images) == 12


def test_ray_driver_opens_no_backend(ray_cluster, bundle, gallery_inputs, tmp_path, monkeypatch):
    """``index --ray``: the driver plans the shards and lists them; only the workers open a backend,
    so a head node without a GPU (or TensorRT) can drive GPU workers. On the driver every way to a
    backend raises here; the workers (other processes) are untouched."""
    import fbnet.runtime.cli as cli
    from fbnet.runtime.engine import backends, ensemble, retriever
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.gallery import open_gallery

    def no_backend(*args, **kwargs):
        raise AssertionError("the Ray driver opened a backend")

    for owner, name in ((ensemble, "select_backend"), (backends, "select_backend"), (retriever.Retriever, "__init__"),
                        (backends.OnnxRuntimeBackend, "__init__"), (backends.TensorRTBackend, "__init__")):
        monkeypatch.setattr(owner, name, no_backend)
    out = tmp_path / "g"
    code = cli.main(["index", "--bundle", str(bundle), "--images", str(gallery_inputs / "images"),
                     "--captions", str(gallery_inputs / "captions.txt"), "--out", str(out), "--ray",
                     "--shard-size", "6", "--ray-workers", "2"])
    assert code == 0
    monkeypatch.undo()
    assert len(open_gallery(out, open_bundle(bundle)).images) == 12
