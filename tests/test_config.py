"""Config files: a ``base:`` key lays a file over another, and every file in ``configs/`` loads."""

from pathlib import Path

import pytest

from fbnet.config import FBNetConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_base_lays_sections_over_the_base_key_by_key(tmp_path):
    (tmp_path / "root.yaml").write_text(
        "model: {embed_dim: 64, backbone: {name: mobilenet_v2, mode: roi, image_size: 224}}\n"
        "train: {epochs: 5, lr: 0.001}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\ntrain: {epochs: 7}\n")
    (tmp_path / "sub" / "top.yaml").write_text(
        "base: mid.yaml\nmodel: {backbone: {output_stride: 16}}\ndata: {views: [identity, hflip]}\n")
    cfg = FBNetConfig.load(tmp_path / "sub" / "top.yaml")
    # a two-file chain, each base relative to the file naming it; a nested mapping merges, values replace
    assert (cfg.model.embed_dim, cfg.model.backbone.name, cfg.model.backbone.image_size) == (64, "mobilenet_v2", 224)
    assert cfg.model.backbone.output_stride == 16
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.001)
    assert cfg.data.views == ("identity", "hflip")
    # the same result as writing the merged file out by hand
    by_hand = FBNetConfig.from_dict({
        "model": {"embed_dim": 64, "backbone": {"name": "mobilenet_v2", "mode": "roi", "image_size": 224,
                                                "output_stride": 16}},
        "train": {"epochs": 7, "lr": 0.001}, "data": {"views": ["identity", "hflip"]}})
    assert cfg == by_hand


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    FBNetConfig.load(path)


@pytest.mark.parametrize("name, key, theirs, ours", [("flickr8k-os16.yaml", "output_stride", 32, 16),
                                                      ("flickr8k-top4.yaml", "trainable_blocks", 2, 4),
                                                      ("flickr8k-top6.yaml", "trainable_blocks", 2, 6)])
def test_a_recipe_variant_is_the_recipe_with_one_knob_and_its_own_cache(name, key, theirs, ours):
    names = {p.name: p for p in CONFIGS}
    recipe = FBNetConfig.load(names["flickr8k.yaml"]).to_dict()
    variant = FBNetConfig.load(names[name]).to_dict()
    assert variant["model"]["backbone"].pop(key) == ours
    assert recipe["model"]["backbone"].pop(key) == theirs
    assert variant["data"].pop("feature_cache") != recipe["data"].pop("feature_cache")
    assert variant == recipe
