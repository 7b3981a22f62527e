"""The fast tier's run through every stage, on a tiny model given one epoch (``tiny_run``,
``tiny_bundle`` in conftest.py): evaluation, parity, an ensemble and its description, INT8 export,
galleries (plain, coded, sharded, IVF) and queries through ``fbnet-serve-cli``, the HTTP server,
Triton's request handling and model repository, and the PyTriton environment's pins.

Nothing here judges quality (the slow tier does, on trained models): each stage must run, and
stages that should agree must agree.
"""

import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_ok

SERVE_CLI = [sys.executable, "-c", ("import sys; sys.argv[0] = 'fbnet-serve-cli'; "
                                    "from fbnet.runtime.cli import console; console()")]


def serve_cli(*args, ok=True) -> str:
    done = subprocess.run([*SERVE_CLI, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)
    assert (done.returncode == 0) == ok, (args, done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


@pytest.fixture(scope="module")
def gallery(tiny_run, tiny_bundle, tmp_path_factory):
    """The tiny set's test images and their first captions, indexed by the CLI."""
    root = tmp_path_factory.mktemp("tiny_gallery")
    items = [json.loads(line) for line in (tiny_run / "data" / "manifest.jsonl").read_text().splitlines()]
    (root / "captions.txt").write_text("".join(it["captions"][0] + "\n" for it in items))
    serve_cli("index", "--bundle", tiny_bundle, "--images", tiny_run / "data" / "images",
              "--captions", root / "captions.txt", "--out", root / "gallery")
    return root


def test_run_and_bundle_hold_what_they_promise(tiny_run, tiny_bundle):
    from fbnet.info import describe
    from fbnet.runtime.engine.bundle import open_bundle

    run = tiny_run / "run"
    for name in ("best.pt", "last.pt", "log.jsonl", "curves.png", "metrics-test.json", "pr-test.png"):
        assert (run / name).is_file(), name
    assert any("model" in line for line in describe(run / "best.pt"))
    bundle = open_bundle(tiny_bundle)
    assert {"detector", "image_encoder", "text_encoder", "scorer", "reranker"} <= set(bundle.manifest.graphs)


def test_evaluate_parity_and_ensemble(tiny_run, tiny_bundle, tmp_path):
    from fbnet.info import describe

    best = tiny_run / "run" / "best.pt"
    assert "R@sum" in cli_ok("evaluate", best, "--split", "test", "--out", tmp_path / "eval")
    cli_ok("parity", best, tiny_bundle, "--split", "test", "--backend", "onnxruntime", "--json", tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())
    cli_ok("ensemble", best, best, "--out", tmp_path / "pair.yaml", "--grid", "1")
    assert "R@sum" in cli_ok("evaluate", tmp_path / "pair.yaml", "--split", "test")
    assert describe(tmp_path / "pair.yaml")


def test_int8_export(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "int8")  # SOURCE may be a bundle: quantized in place
    cli_ok("export", bundle, "--int8", "--calibration-images", "4")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["graphs"] == ["detector"]


def _hits(out: str) -> list[list[int]]:
    return [[h["index"] for h in r["hits"]] for r in json.loads(out)["results"]]


def test_galleries_and_queries_through_the_cli(tiny_run, tiny_bundle, gallery, tmp_path):
    image = min((tiny_run / "data" / "images").iterdir())
    common = ["--bundle", tiny_bundle, "--top-k", "3", "--json"]
    plain = gallery / "gallery"
    two_stage = serve_cli(image, "--text", "a big red circle on grass", "--gallery", plain, "--shortlist", "20", *common)
    exhaustive = serve_cli(image, "--text", "a big red circle on grass", "--gallery", plain, "--exhaustive", *common)
    assert _hits(two_stage) == _hits(exhaustive)  # the shortlist covers the gallery: the same ranking
    assert "1." in serve_cli(image, "--bundle", tiny_bundle, "--gallery", plain)

    inputs = ["--bundle", tiny_bundle, "--images", tiny_run / "data" / "images", "--captions", gallery / "captions.txt"]
    coded = tmp_path / "sq8-ivf-shards"
    serve_cli("index", *inputs, "--out", coded, "--store", "sq8", "--first-stage", "ivf", "--shard-size", "8")
    assert (coded / "shards.json").is_file()
    assert len(_hits(serve_cli("--text", "a dog", "--gallery", coded, "--nprobe", "1", *common))[0]) == 3
    serve_cli("--text", "   ", "--gallery", plain, *common, ok=False)  # an empty caption: an error, not hits


def _service(bundle: Path, gallery_dir: Path):
    from fbnet.runtime.engine.backends import select_backend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery import open_gallery
    from fbnet.runtime.serving.service import SearchService

    b = open_bundle(bundle)
    retriever = Retriever(b, select_backend(b, "onnxruntime"))
    return SearchService(retriever, open_gallery(gallery_dir, b), shortlist=5)


def test_http_server_answers(tiny_run, tiny_bundle, gallery):
    from fbnet.runtime.serving.server import SearchServer, ServeConfig, listen, uvicorn_server

    server = SearchServer(lambda: _service(tiny_bundle, gallery / "gallery"), ServeConfig())
    sock = listen("127.0.0.1", 0)
    userver = uvicorn_server(server, "h11")
    thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def get(path, data=None):
        with urllib.request.urlopen(urllib.request.Request(base + path, data=data), timeout=60) as r:
            return r.read()

    try:
        assert server.wait_ready(60), server.load_error
        assert json.loads(get("/ready"))["status"] == "ready"
        text = json.loads(get("/search/text", json.dumps({"text": "a big red circle", "top_k": 2}).encode()))
        assert len(text["results"][0]["hits"]) == 2
        image = min((tiny_run / "data" / "images").iterdir())
        assert json.loads(get("/search/image?top_k=2", image.read_bytes()))["results"][0]["hits"]
        assert b"fbnet_requests_total" in get("/metrics") and b"<html" in get("/").lower()
    finally:
        userver.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()


def test_triton_requests_and_repository(tiny_run, tiny_bundle, gallery, tmp_path):
    from fbnet.runtime.serving.service import TextQuery
    from fbnet.errors import FbnetError
    from fbnet.runtime.serving.triton import answer, batch_axis, parse_rows, result_json
    from fbnet.runtime.serving.triton_env import _requirements, default_dir

    service = _service(tiny_bundle, gallery / "gallery")
    image = min((tiny_run / "data" / "images").iterdir()).read_bytes()
    texts = parse_rows("text", {"text": np.array([[b"a big red circle"], [b"a dog"]], dtype=object),
                                "top_k": np.array([[2], [0]], dtype=np.int32)}, canvas=64)
    assert isinstance(texts[0], TextQuery) and isinstance(texts[1], Exception)  # top_k 0 is refused
    # a bad row keeps its exception (the Triton model answers it as a request error, HTTP 400)
    out = answer(service, "text", texts)
    assert len(json.loads(result_json(out[0]))["hits"]) == 2 and isinstance(out[1], FbnetError)
    images = parse_rows("image", {"image": np.array([[image], [b"garbage"]], dtype=object)}, canvas=64)
    out = answer(service, "image", images)
    assert json.loads(result_json(out[0]))["hits"] and isinstance(out[1], FbnetError)
    assert batch_axis(service.retriever.bundle.manifest.graphs["text_encoder"])

    cli_ok("export", tiny_bundle, "--triton", tmp_path / "repo", "--gallery", gallery / "gallery")
    assert (tmp_path / "repo" / "fbnet_search_text" / "config.pbtxt").is_file()
    assert (tmp_path / "repo" / "fbnet_text_encoder" / "config.pbtxt").is_file()
    assert any(r.startswith("nvidia-pytriton") for r in _requirements()) and default_dir().name


def test_shards_built_as_ray_actors_build_them(tiny_run, tiny_bundle, gallery, tmp_path):
    """What ``index --ray`` maps over Ray Data, without Ray: the plan, one actor's builds, the finish."""
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.engine_tags import engine_name, gpu_compute_capability
    from fbnet.runtime.gallery.ray_index import ShardBuilder
    from fbnet.runtime.gallery import open_gallery
    from fbnet.runtime.gallery.shards import finish_shards, plan_shards

    bundle = open_bundle(tiny_bundle)
    images = sorted(str(p) for p in (tiny_run / "data" / "images").iterdir())
    captions = (gallery / "captions.txt").read_text().splitlines()
    jobs = plan_shards(bundle, images, captions, tmp_path / "g", 8)
    actor = ShardBuilder(str(tiny_bundle), "onnxruntime", 1, {})
    batch = {"path": [str(j.path) for j in jobs], "images": [j.images for j in jobs],
             "captions": [j.captions for j in jobs]}
    assert actor(batch)["path"] == batch["path"]
    finish_shards(bundle, tmp_path / "g", jobs, 8)
    sharded = open_gallery(tmp_path / "g", bundle)
    assert sharded.image_features is not None and len(sharded.images) == len(images)
    assert all(j.done for j in plan_shards(bundle, images, captions, tmp_path / "g", 8))  # a rerun resumes past them
    assert engine_name("scorer", "10.3", "90") == "scorer.trt10.3.sm90.engine"
    assert gpu_compute_capability() is None or gpu_compute_capability().isdigit()
