"""``fbnet info``: what a checkpoint, bundle, gallery or ensemble file holds, and altered files named."""

import shutil

import yaml
from click.testing import CliRunner

from fbnet.cli import main


def _info(path):
    res = CliRunner().invoke(main, ["info", str(path)])
    return res.exit_code, res.output


def test_info_describes_checkpoint_bundle_gallery_and_ensemble(trained, bundle, served, tmp_path):
    code, out = _info(trained / "run" / "best.pt")
    assert code == 0 and "fbnet checkpoint" in out and "model: fbnet, d=128" in out
    assert "fusion weights: alpha" in out and "validation: category MAP" in out and "sha256: " in out

    code, out = _info(bundle)
    assert code == 0 and "fbnet bundle" in out and "graph scorer: scorer.onnx" in out
    assert "keys B1 B2 B3 F1 F2 F3" in out and "sha256: 11 of 11 files as exported" in out

    _, _, gallery = served
    code, out = _info(gallery)
    assert code == 0 and "12 images, 12 captions" in out and "store: " in out and "encoders" in out

    ens = tmp_path / "ens.yaml"
    ens.write_text(yaml.safe_dump({"kind": "fbnet-ensemble", "members": [
        {"checkpoint": str(trained / "run" / "best.pt"), "weight": 1.0}]}))
    code, out = _info(ens)
    assert code == 0 and "ensemble of 1 members" in out and "weight 1.0" in out


def test_info_names_altered_files_and_unknown_paths(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "vocab.json").write_text("{}")
    code, out = _info(copy)
    assert code == 0 and "vocab.json altered" in out
    code, out = _info(tmp_path / "nothing")
    assert code == 1 and "not a checkpoint, ensemble file, bundle" in out and "Traceback" not in out
