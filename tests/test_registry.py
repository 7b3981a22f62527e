"""The registries and the model interface: every registered model satisfies the one Protocol, and
the config accepts exactly the registered names. Training curves and TensorBoard scalars."""

import json

import pytest

from fbnet.config import ConfigError, FBNetConfig
from fbnet.models.registry import BACKBONES, DETECTORS, LOSSES, MODELS, RetrievalModel, build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_registered_model_satisfies_the_interface(name):
    cfg = FBNetConfig.from_dict({"model": {"name": name, "embed_dim": 32, "heads": 4, "concepts": 8}})
    assert isinstance(build_model(cfg.model, 20, 64), RetrievalModel)


@pytest.mark.parametrize("section,key,registry", [("backbone", "name", BACKBONES), ("detector", "name", DETECTORS)])
def test_config_names_come_from_the_registries(section, key, registry):
    for name in registry:
        if not (section == "backbone" and name == "detector"):  # needs its detector (a cross-field rule)
            FBNetConfig.from_dict({"model": {section: {key: name}}})
    with pytest.raises(ConfigError, match=f"known: {', '.join(registry)}"):
        FBNetConfig.from_dict({"model": {section: {key: "nope"}}})
    for loss in LOSSES:
        FBNetConfig.from_dict({"loss": {"name": loss}})


def test_training_curves_and_tensorboard(tmp_path):
    from fbnet.curves import TensorBoard, epoch_records, plot_curves

    records = [{"event": "epoch", "epoch": e, "loss": 2.0 / e, "val_map": 0.1 * e, "val_rsum": 50.0 * e, "lr": 1e-3}
               for e in (1, 2, 3)]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"event": "start"}, *records,
                                                          {**records[2], "val_map": 0.5}]))
    assert [r["epoch"] for r in epoch_records(log)] == [1, 2, 3] and epoch_records(log)[2]["val_map"] == 0.5
    png = plot_curves(log, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pytest.importorskip("tensorboard")
    board = TensorBoard(tmp_path)
    board.step(0, 1.5)
    board.epoch(records[0])
    board.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
