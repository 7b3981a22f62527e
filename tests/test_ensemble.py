"""Ensembles (:mod:`fbnet.ensemble`): weights chosen on validation, scores equal to the weighted sum
of the members' own, the same metrics file as one checkpoint, and bad ensembles named."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import CONFIG, cli_ok, free_ports
from fbnet.cli import main


@pytest.fixture(scope="module")
def members(trained, tmp_path_factory):
    """The FB-Net fixture's checkpoint and a second seed trained on its cached features."""
    root = tmp_path_factory.mktemp("seed2")
    (root / "run").mkdir()
    shutil.copy(trained / "run" / "detector.pt", root / "run" / "detector.pt")
    (root / "cfg.yaml").write_text(CONFIG.replace("train:\n", "train:\n  seed: 7\n  epochs: 3\n", 1).replace(
        "  epochs: 6\n  batch_size: 64", "  batch_size: 64") + f"data: {{feature_cache: {trained / 'run' / 'features'}}}\n")
    res = CliRunner().invoke(main, ["train", "--data", str(trained / "data"), "--config", str(root / "cfg.yaml"),
                                    "--out", str(root / "run")])
    assert res.exit_code == 0, res.output
    return [trained / "run" / "best.pt", root / "run" / "best.pt"]


def test_ensemble_scores_are_the_weighted_sum_of_its_members(members, tmp_path):
    out = tmp_path / "ens.yaml"
    res = CliRunner().invoke(main, ["ensemble", *map(str, members), "--out", str(out), "--grid", "0.5,2"])
    assert res.exit_code == 0, res.output
    assert "member weights (val)" in res.output and "R@sum" in res.output
    spec = yaml.safe_load(out.read_text())
    assert spec["kind"] == "fbnet-ensemble" and spec["members"][0]["weight"] == 1.0
    weight = spec["members"][1]["weight"]
    assert weight in (0.5, 2.0)

    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(out), "--split", "test", "--out", str(tmp_path / "ens")])
    assert res.exit_code == 0, res.output
    parts = []
    for i, ckpt in enumerate(members):
        res = runner.invoke(main, ["evaluate", str(ckpt), "--split", "test", "--out", str(tmp_path / f"m{i}")])
        assert res.exit_code == 0, res.output
        parts.append(np.load(tmp_path / f"m{i}" / "scores-test.npz")["fused"])
    got = np.load(tmp_path / "ens" / "scores-test.npz")
    assert np.allclose(got["fused"], parts[0] + weight * parts[1], atol=1e-5)
    single = json.loads((tmp_path / "m0" / "metrics-test.json").read_text())
    ensemble = json.loads((tmp_path / "ens" / "metrics-test.json").read_text())
    assert set(single) - {"fusion"} <= set(ensemble) and ensemble["model"] == "ensemble"
    assert [m["weight"] for m in ensemble["members"]] == [1.0, weight]


def _fails_naming(args, needle):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, res.output


def test_bad_ensembles_are_named(members, tmp_path):
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"kind": "fbnet-ensemble", "members": [
        {"checkpoint": str(members[0]), "weight": 1.0}, {"checkpoint": "nowhere/best.pt", "weight": 1.0}]}))
    _fails_naming(["evaluate", str(missing)], "nowhere/best.pt")

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    bad = tmp_path / "foreign.yaml"
    bad.write_text(yaml.safe_dump({"kind": "fbnet-ensemble", "members": [{"checkpoint": str(foreign), "weight": 1}]}))
    _fails_naming(["evaluate", str(bad)], "foreign.pt: not an fbnet checkpoint")

    ckpt = torch.load(members[1], weights_only=False)
    ckpt["config"]["model"]["backbone"]["image_size"] = 96
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump({"kind": "fbnet-ensemble", "members": [
        {"checkpoint": str(members[0]), "weight": 1}, {"checkpoint": str(other), "weight": 1}]}))
    _fails_naming(["evaluate", str(mixed)], "different canvases")

    weightless = tmp_path / "weight.yaml"
    weightless.write_text(yaml.safe_dump({"kind": "fbnet-ensemble", "members": [{"checkpoint": str(members[0]), "weight": -1}]}))
    _fails_naming(["evaluate", str(weightless)], "members[0].weight")


# -- the runtime: ensemble bundles, galleries, search, parity, serving --------------------------------
@pytest.fixture(scope="module")
def ensemble_bundle(members, tmp_path_factory):
    """The two members weighted 1 and 0.5, exported as one ensemble bundle."""
    root = tmp_path_factory.mktemp("ensemble")
    spec = root / "ens.yaml"
    spec.write_text(yaml.safe_dump({"kind": "fbnet-ensemble", "members": [
        {"checkpoint": str(members[0]), "weight": 1.0}, {"checkpoint": str(members[1]), "weight": 0.5}]}))
    out = cli_ok("export", spec, "--out", root / "bundle")
    assert "wrote ensemble bundle" in out and out.count("max |diff|") >= 8  # each member's graphs checked
    return spec, root / "bundle"


@pytest.fixture(scope="module")
def ensemble_gallery(ensemble_bundle, gallery_inputs, tmp_path_factory):
    from fbnet.runtime.cli import cli

    out = tmp_path_factory.mktemp("ensemble-gallery") / "gallery"
    res = CliRunner().invoke(cli, ["index", "--bundle", str(ensemble_bundle[1]), "--images",
                                   str(gallery_inputs / "images"), "--captions", str(gallery_inputs / "captions.txt"),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _member_retrievers(bundle):
    from fbnet.runtime.engine.backends import select_backend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever

    members = [open_bundle(bundle / f"member{i}") for i in range(2)]
    return [Retriever(b, select_backend(b, "onnxruntime")) for b in members]


def test_ensemble_bundle_scores_are_the_weighted_sum_and_pass_parity(ensemble_bundle, gallery_inputs, tmp_path):
    from fbnet.runtime.engine.ensemble import EnsembleRetriever, open_retriever

    spec, bundle = ensemble_bundle
    retriever = open_retriever(bundle, "onnxruntime")
    assert isinstance(retriever, EnsembleRetriever) and retriever.weights == [1.0, 0.5]
    images = sorted((gallery_inputs / "images").iterdir())[:5]
    captions = (gallery_inputs / "captions.txt").read_text().splitlines()[:7]
    got = retriever.score(retriever.encode_images(images), retriever.encode_texts(captions))
    one, two = (r.score(r.encode_images(images), r.encode_texts(captions)) for r in _member_retrievers(bundle))
    assert got.shape == (5, 7) and np.allclose(got, one + 0.5 * two, atol=1e-5)
    # the members share the detector (the second seed trained on the first's): one detection a photo
    assert retriever.members[0].boxes_key == retriever.members[1].boxes_key
    calls = []
    for m in retriever.members:
        run = m.backend.run
        m.backend.run = lambda graph, feeds, run=run: calls.append(graph) or run(graph, feeds)
    retriever.encode_images(images)
    assert calls.count("detector") == len(images) and calls.count("image_encoder") == 2
    assert not np.allclose(one, two, atol=1e-3)  # two different models, so the sum is a real ensemble

    out = cli_ok("parity", spec, bundle, "--split", "test", "--backend", "onnxruntime", "--json", tmp_path / "p.json")
    result = json.loads((tmp_path / "p.json").read_text())
    assert "PASS" in out and result["passed"] and result["max_score_diff"] < 5e-2
    info = cli_ok("info", bundle)
    assert "ensemble bundle of 2 members (weights 1, 0.5" in info and info.count("fbnet bundle (format") == 2


def test_ensemble_two_stage_search_through_the_server(ensemble_bundle, ensemble_gallery, gallery_inputs):
    import subprocess
    import sys
    import time
    import urllib.request

    from fbnet.runtime.engine.ensemble import open_retriever
    from fbnet.runtime.gallery import open_gallery
    from fbnet.runtime.search.searcher import Searcher

    _, bundle = ensemble_bundle
    retriever = open_retriever(bundle, "onnxruntime")
    g = open_gallery(ensemble_gallery, retriever.bundle)
    assert len(g.images) == 12 and len(g.captions) == 12 and len(g.members) == 2
    assert "ensemble gallery of 2 member galleries" in cli_ok("info", ensemble_gallery)
    caption, image = "a big red circle on grass", sorted((gallery_inputs / "images").iterdir())[2]
    # exhaustive ranking by the members' weighted sum, each member's gallery features as indexed
    scores = retriever.score(g.image_features, retriever.encode_texts([caption]))[:, 0]
    assert np.allclose(scores, sum(w * r.score(m.image_features, r.encode_texts([caption]))[:, 0] for w, r, m in
                                   zip((1.0, 0.5), _member_retrievers(bundle), g.members)), atol=1e-5)
    exhaustive = np.argsort(-scores, kind="stable")[:4]
    searcher = Searcher(retriever, g.image_features, g.text_features, 6)
    two_stage = searcher.images_for(retriever.encode_texts([caption]), 4)[0]
    assert set(two_stage.index) <= set(range(12)) and np.allclose(two_stage.score, scores[two_stage.index], atol=1e-5)

    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "fbnet.runtime.cli", "serve", "--bundle", str(bundle), "--gallery",
                             str(ensemble_gallery), "--port", str(port), "--shortlist", "12", "--quiet",
                             "--backend", "onnxruntime"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the server did not become ready within 120 s"
            time.sleep(0.2)
        ask = urllib.request.Request(base + "/search/text", json.dumps({"text": caption, "top_k": 4}).encode())
        with urllib.request.urlopen(ask, timeout=60) as r:
            hits = json.loads(r.read())["results"][0]["hits"]
        # a shortlist covering the gallery re-ranks every item: exhaustive search's answer
        assert [h["index"] for h in hits] == list(exhaustive)
        assert np.allclose([h["score"] for h in hits], scores[exhaustive], atol=1e-4)
        with urllib.request.urlopen(urllib.request.Request(base + "/search/image?top_k=3", image.read_bytes()),
                                    timeout=60) as r:
            hits = json.loads(r.read())["results"][0]["hits"]
        want = retriever.score(retriever.encode_images([image]), g.text_features)[0]
        assert [h["index"] for h in hits] == list(np.argsort(-want, kind="stable")[:3])
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_ensemble_bundles_and_galleries_refuse_what_does_not_match(ensemble_bundle, ensemble_gallery, served,
                                                                   tmp_path):
    from fbnet.runtime.cli import cli

    spec, bundle = ensemble_bundle
    _, _, single_gallery = served

    def serve_cli_fails(args, needle):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1, res.output
        lines = [ln for ln in res.output.strip().splitlines() if ln]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, res.output

    query = ["query", "--text", "a red circle"]
    serve_cli_fails([*query, "--bundle", str(bundle / "member0"), "--gallery", str(ensemble_gallery)],
                    "an ensemble's gallery: search it with its ensemble bundle")
    serve_cli_fails([*query, "--bundle", str(bundle), "--gallery", str(single_gallery)],
                    "one model's gallery: an ensemble bundle")
    # a member bundle swapped for another export is named
    altered = tmp_path / "altered"
    shutil.copytree(bundle, altered)
    manifest = json.loads((altered / "member1" / "manifest.json").read_text())
    manifest["created"] = "another export"
    (altered / "member1" / "manifest.json").write_text(json.dumps(manifest))
    serve_cli_fails([*query, "--bundle", str(altered), "--gallery", str(ensemble_gallery)],
                    f"{altered / 'member1' / 'manifest.json'}: not the member 1 bundle")
    # parity of an ensemble file against a bundle that is not its export
    other = tmp_path / "other.yaml"
    other.write_text(spec.read_text().replace("weight: 0.5", "weight: 2.0"))
    _fails_naming(["parity", str(other), str(bundle), "--split", "test"], "not its bundle")
