"""Ensembles (:mod:`fbnet.ensemble`): weights chosen on validation, scores equal to the weighted sum
of the members' own, the same metrics file as one checkpoint, and bad ensembles named."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import CONFIG
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
