"""Bad input through the real command-line tools: each case runs the installed ``fbnet`` or
``fbnet-serve-cli`` as a subprocess and checks exit code 1, exactly one line of output, that the
line names the file or key at fault, and no traceback (every expected failure is an
:class:`~fbnet.errors.FbnetError`). The server answers a bad query with a JSON 4xx.

The bundle and galleries come from a tiny model trained for one epoch on 40 synthetic images
(seconds): errors do not depend on how good the model is.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import free_ports

TINY = """
model:
  embed_dim: 32
  word_dim: 16
  levels: 2
  backbone: {name: resnet18, image_size: 64}
  detector: {name: none, max_boxes: 2}
train:
  epochs: 1
  batch_size: 16
"""


def command(name: str, module: str) -> list[str]:
    """The console script ``name`` of this installation (beside the interpreter running the tests,
    else on PATH), else ``python -m module``."""
    script = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    return [script] if script else [sys.executable, "-m", module]


FBNET = command("fbnet", "fbnet.cli")
SERVE = command("fbnet-serve-cli", "fbnet.runtime.cli")


def run(cmd: list[str], *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "FBNET_HOME": str(cwd / "fbnet-home")}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def fails(cmd: list[str], *args, names: tuple[str, ...], cwd: Path) -> str:
    """Run a command that must fail cleanly; return its one line."""
    res = run(cmd, *args, cwd=cwd)
    output = (res.stdout + res.stderr).strip()
    assert res.returncode == 1, f"exit {res.returncode}:\n{output}"
    assert "Traceback" not in output, output
    lines = output.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines:\n{output}"
    assert lines[0].startswith("Error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-epoch model's bundle, and a gallery of 6 test images and 4 captions."""
    from fbnet.cli import main as fbnet_main
    from fbnet.data.synth import generate
    from fbnet.runtime.cli import main as serve_main

    root = tmp_path_factory.mktemp("tiny")
    generate(root / "data", seed=0, sizes=(40, 10, 10), image_size=64)
    (root / "tiny.yaml").write_text(TINY)
    runner = CliRunner()
    res = runner.invoke(fbnet_main, ["train", "--data", str(root / "data"), "--config", str(root / "tiny.yaml"),
                                     "--out", str(root / "run")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(fbnet_main, ["export", str(root / "run" / "best.pt"), "--out", str(root / "bundle")])
    assert res.exit_code == 0, res.output
    items = [json.loads(line) for line in (root / "data" / "manifest.jsonl").read_text().splitlines()]
    (root / "images").mkdir()
    for it in [i for i in items if i["split"] == "test"][:6]:
        shutil.copy(root / "data" / it["image"], root / "images")
    (root / "captions.txt").write_text("a red circle on bricks\na blue square\na green triangle on grass\na star\n")
    assert serve_main(["index", "--bundle", str(root / "bundle"), "--images", str(root / "images"),
                       "--captions", str(root / "captions.txt"), "--out", str(root / "gallery")]) == 0
    return root


def damaged_copy(tiny: Path, tmp_path: Path, name: str = "gallery") -> Path:
    out = tmp_path / name
    shutil.copytree(tiny / "gallery", out)
    return out


# -- fbnet ---------------------------------------------------------------------------------------
def test_negative_epochs_fail_at_load_naming_key_and_file(tmp_path):
    (tmp_path / "c.yaml").write_text("train: {epochs: -3}\n")
    line = fails(FBNET, "train", "--config", "c.yaml", names=("c.yaml", "train.epochs"), cwd=tmp_path)
    assert "-3" in line
    # refused before any work: no dataset generated, no run directory
    assert not (tmp_path / "fbnet-home").exists() and not (tmp_path / "runs").exists()


def test_zero_detector_epochs_fail_at_load():
    """Fine-tuning the detector for 0 epochs once crashed deep in OneCycleLR; now the config says no."""
    from fbnet.config import ConfigError, FBNetConfig

    with pytest.raises(ConfigError, match=r"c.yaml: 'model.detector.epochs'.*greater than or equal to 1"):
        FBNetConfig.from_dict({"model": {"detector": {"epochs": 0}}}, "c.yaml")


def test_unknown_config_key(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  embed_dimm: 64\n")
    fails(FBNET, "train", "--config", "c.yaml", names=("c.yaml", "model.embed_dimm", "unknown key"), cwd=tmp_path)


def test_set_overrides_are_checked_like_the_file(tmp_path):
    """``fbnet train --set`` goes through the same validation as a config file: a typo'd key, a path
    through a value or an assignment without ``=`` is one line naming the assignment, before any work."""
    fails(FBNET, "train", "--set", "loss.nme=triplet", names=("--set loss.nme=triplet", "unknown key"), cwd=tmp_path)
    fails(FBNET, "train", "--set", "loss.name.x=1", names=("loss.name.x=1", "'loss.name' is a value"), cwd=tmp_path)
    fails(FBNET, "train", "--set", "loss", names=("--set 'loss'", "section.key=value"), cwd=tmp_path)
    assert not (tmp_path / "runs").exists()


def test_set_overrides_apply_in_any_order():
    from fbnet.config import FBNetConfig

    cfg = FBNetConfig().with_overrides(["loss.warmup_epochs=1", "loss.name=triplet", "data.views=[identity, hflip]"])
    assert (cfg.loss.name, cfg.loss.warmup_epochs, cfg.data.views) == ("triplet", 1, ("identity", "hflip"))
    assert FBNetConfig().with_overrides([]) == FBNetConfig()
    # An empty value turns the pooled global branch off, as "" does (YAML reads it as null).
    pooled = FBNetConfig().with_overrides(["model.global_pool=gpo"])
    assert pooled.with_overrides(["model.global_pool="]).model.global_pool == ""


def test_config_base_missing_or_circular(tmp_path):
    (tmp_path / "c.yaml").write_text("base: gone.yaml\n")
    fails(FBNET, "train", "--config", "c.yaml", names=("c.yaml", "'base'", "gone.yaml"), cwd=tmp_path)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {epochs: 2}\n")
    fails(FBNET, "train", "--config", "a.yaml", names=("b.yaml", "'base'", "a.yaml", "chain"), cwd=tmp_path)
    assert not (tmp_path / "runs").exists()


def test_config_cross_field_rule(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  backbone: {name: detector}\n  detector: {name: yolov3_tiny}\n")
    fails(FBNET, "train", "--config", "c.yaml", names=("c.yaml", "backbone 'detector'", "yolov3_tiny"), cwd=tmp_path)


def test_missing_checkpoint(tmp_path):
    fails(FBNET, "evaluate", "gone.pt", names=("gone.pt", "checkpoint not found"), cwd=tmp_path)
    fails(FBNET, "export", "gone.pt", "--out", "bundle", names=("gone.pt", "checkpoint not found"), cwd=tmp_path)


def test_detector_size_needs_yolo_and_a_multiple_of_32(tiny, tmp_path):
    ckpt = tiny / "run" / "best.pt"
    fails(FBNET, "export", ckpt, "--out", "b", "--detector-size", "160", names=(str(ckpt), "'none'", "yolov3_tiny"),
          cwd=tmp_path)
    fails(FBNET, "export", ckpt, "--out", "b", "--detector-size", "100", names=(str(ckpt), "multiple of 32"),
          cwd=tmp_path)
    assert not (tmp_path / "b").exists()


def test_ensemble_naming_a_missing_checkpoint(tmp_path):
    (tmp_path / "ens.yaml").write_text("kind: fbnet-ensemble\nmembers:\n  - {checkpoint: gone.pt, weight: 1.0}\n")
    fails(FBNET, "evaluate", "ens.yaml", names=("ens.yaml", "members[0]", "gone.pt"), cwd=tmp_path)


def test_resume_refuses_new_word_vectors(tmp_path):
    fails(FBNET, "train", "--resume", "--word-vectors", "vectors.bin", "--out", "R",
          names=("--word-vectors", str(Path("R") / "last.pt")), cwd=tmp_path)


# -- fbnet-serve-cli -------------------------------------------------------------------------------
def test_missing_bundle(tiny, tmp_path):
    fails(SERVE, "query", "--text", "a red circle", "--bundle", tmp_path / "nowhere", "--gallery", tiny / "gallery",
          names=("nowhere", "bundle directory not found"), cwd=tmp_path)


def test_damaged_gallery_json(tiny, tmp_path):
    gallery = damaged_copy(tiny, tmp_path)
    text = (gallery / "gallery.json").read_text()
    (gallery / "gallery.json").write_text(text[: len(text) // 2])
    fails(SERVE, "--text", "a red circle", "--bundle", tiny / "bundle", "--gallery", gallery,
          names=("gallery.json", "invalid JSON"), cwd=tmp_path)


def test_gallery_json_with_a_wrong_type(tiny, tmp_path):
    gallery = damaged_copy(tiny, tmp_path)
    meta = json.loads((gallery / "gallery.json").read_text())
    (gallery / "gallery.json").write_text(json.dumps({**meta, "n_images": "many"}))
    fails(SERVE, "--text", "a red circle", "--bundle", tiny / "bundle", "--gallery", gallery,
          names=("gallery.json", "n_images"), cwd=tmp_path)


def test_manifest_without_a_scorer(tiny, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["graphs"]["scorer"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    fails(SERVE, "--text", "a red circle", "--bundle", bundle, "--gallery", tiny / "gallery",
          names=("manifest.json", "scorer"), cwd=tmp_path)


def test_empty_caption(tiny, tmp_path):
    fails(SERVE, "--text", "  ", "--bundle", tiny / "bundle", "--gallery", tiny / "gallery",
          names=("empty caption",), cwd=tmp_path)


def test_truncated_items_file(tiny, tmp_path):
    gallery = damaged_copy(tiny, tmp_path)
    captions = gallery / "items" / "captions.jsonl"
    captions.write_bytes(captions.read_bytes()[:-5])
    fails(SERVE, "--text", "a red circle", "--bundle", tiny / "bundle", "--gallery", gallery,
          names=(str(captions), "truncated"), cwd=tmp_path)


def test_corrupt_item_line_found_while_answering(tiny, tmp_path):
    """An item line is read only when a hit shows it: the lazily raised ItemsError is one line too."""
    gallery = damaged_copy(tiny, tmp_path)
    images = gallery / "items" / "images.jsonl"
    images.write_bytes(b"\xff" * images.stat().st_size)  # same size: the offsets still match
    image = sorted((tiny / "images").iterdir())[0]
    assert run(SERVE, image, "--bundle", tiny / "bundle", "--gallery", gallery, cwd=tmp_path).returncode == 0
    fails(SERVE, "--text", "a red circle", "--bundle", tiny / "bundle", "--gallery", gallery, "--top-k", "1",
          names=(str(images), "line"), cwd=tmp_path)


def test_truncated_feature_array(tiny, tmp_path):
    gallery = damaged_copy(tiny, tmp_path)
    array = gallery / "texts" / "B1.npy"
    array.write_bytes(array.read_bytes()[:-64])
    fails(SERVE, "--text", "a red circle", "--bundle", tiny / "bundle", "--gallery", gallery,
          names=(str(array),), cwd=tmp_path)


def test_bad_first_stage_file(tiny, tmp_path):
    pytest.importorskip("faiss", reason="an IVF first stage needs faiss (the dev extra)")
    gallery = tmp_path / "ivf"
    res = run(SERVE, "index", "--bundle", tiny / "bundle", "--images", tiny / "images", "--captions",
              tiny / "captions.txt", "--first-stage", "ivf", "--out", gallery, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    index = gallery / "images" / "first_stage.faiss"
    assert index.is_file()
    index.write_bytes(b"not a faiss index")
    fails(SERVE, "--text", "a red circle", "--bundle", tiny / "bundle", "--gallery", gallery,
          names=(str(index), "first-stage index"), cwd=tmp_path)


def test_missing_captions_file_for_index(tiny, tmp_path):
    fails(SERVE, "index", "--bundle", tiny / "bundle", "--captions", "gone.txt", "--out", "g",
          names=("gone.txt", "not found"), cwd=tmp_path)


def test_serve_on_a_port_in_use(tiny, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fails(SERVE, "serve", "--bundle", tiny / "bundle", "--gallery", tiny / "gallery", "--port", port,
              names=(f"127.0.0.1:{port}", "--port"), cwd=tmp_path)


# -- the server -----------------------------------------------------------------------------------
def request(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers or {}), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ready(base: str) -> bool:
    try:
        return request(base + "/ready")[0] == 200
    except (urllib.error.URLError, ConnectionError):
        return False  # not listening yet


def test_server_answers_bad_queries_with_json_4xx(tiny, tmp_path):
    port = free_ports(1)[0]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*SERVE, "serve", "--bundle", str(tiny / "bundle"), "--gallery", str(tiny / "gallery"),
                             "--port", str(port), "--quiet"], stderr=subprocess.DEVNULL, cwd=tmp_path,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        for _ in range(600):
            if ready(base) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None and ready(base), "the server did not start"
        text = base + "/search/text"
        status, err = request(text, json.dumps({"text": "  "}).encode())
        assert status == 400 and "empty caption" in err["error"]
        status, err = request(text, json.dumps({"text": "a star", "top_k": 0}).encode())
        assert status == 400 and "top_k" in err["error"]
        status, err = request(base + "/search/image", b"garbage")
        assert status == 400 and "cannot decode" in err["error"]
        # request heads are bounded (16 KiB by default), whichever HTTP parser uvicorn runs
        status, err = request(text, json.dumps({"text": "a star"}).encode(), {"X-Padding": "a" * 200_000})
        assert status == 431 and "16,384-byte limit" in err["error"]
        assert request(text, json.dumps({"text": "a star"}).encode(), {"X-Padding": "a" * 8_000})[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
