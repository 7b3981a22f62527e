"""Size augmentation (:mod:`fbnet.augment`): what a step's captions lose (``train.word_dropout``)
and which blocks the pooled global branch leaves out (``model.block_dropout``), in training only."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fbnet.augment import drop_words
from fbnet.cli import main
from fbnet.pipeline import Captions


def _captions(rng, n=400, width=12):
    lengths = rng.integers(1, width + 1, size=n)
    ids = np.where(np.arange(width)[None, :] < lengths[:, None], rng.integers(2, 1000, size=(n, width)), 0)
    return ids, lengths


def test_dropped_captions_keep_their_words_in_order():
    rng = np.random.default_rng(0)
    ids, lengths = _captions(rng)
    out, kept = drop_words(ids, lengths, 0.3, np.random.default_rng(1))
    assert out.shape == ids.shape and (kept >= 1).all() and (kept <= lengths).all()
    for row, n, new, k in zip(ids, lengths, out, kept):
        words, left = list(row[:n]), list(new[:k])
        it = iter(words)
        assert all(w in it for w in left)  # a subsequence: the kept words, in their order
        assert not new[k:].any()  # the rest is padding
    share = 1 - kept.sum() / lengths.sum()
    assert 0.25 < share < 0.35, share  # about the rate (a one-word caption always keeps its word)


def test_no_dropout_and_all_dropped():
    rng = np.random.default_rng(2)
    ids, lengths = _captions(rng)
    out, kept = drop_words(ids, lengths, 0.0, rng)
    assert (out == ids).all() and (kept == lengths).all()
    out, kept = drop_words(ids, lengths, 0.999999, rng)
    assert (kept == 1).all()
    assert all(new[0] in row[:n] for row, n, new in zip(ids, lengths, out))


def test_only_training_captions_are_dropped():
    rng = np.random.default_rng(3)
    ids, lengths = _captions(rng, n=50)
    caps = Captions(ids, lengths, np.repeat(np.arange(10), 5), None, None, word_dropout=0.5)
    whole, _ = caps.tensors(np.arange(50))  # no rng: whole captions
    assert torch.equal(whole, torch.from_numpy(ids[:, :lengths.max()]))
    caps.rng = np.random.default_rng(4)
    dropped, dropped_lengths = caps.tensors(np.arange(50))
    assert dropped_lengths.sum() < lengths.sum() and dropped.shape[1] == dropped_lengths.max()
    assert caps.first_per_image(1).rng is None  # what validation scores is whole


def test_a_run_with_word_dropout_trains_differently(tiny_synth, tmp_path):
    """The same seed with and without ``--set train.word_dropout``: the first epoch's loss differs,
    and a second run with dropout repeats the first exactly (the draws are seeded)."""
    runner = CliRunner()
    (tmp_path / "c.yaml").write_text("model: {embed_dim: 32, backbone: {name: resnet18, image_size: 64}, "
                                     "detector: {name: none}}\ntrain: {epochs: 1, batch_size: 16}\n")

    def first_loss(out, *extra):
        res = runner.invoke(main, ["train", "--data", str(tiny_synth), "--config", str(tmp_path / "c.yaml"),
                                   "--out", str(tmp_path / out), *extra])
        assert res.exit_code == 0, res.output
        log = [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]
        return next(e["loss"] for e in log if e["event"] == "epoch")

    dropped = first_loss("a", "--set", "train.word_dropout=0.3")
    assert dropped == first_loss("b", "--set", "train.word_dropout=0.3")
    assert dropped != first_loss("c")


def test_block_dropout_leaves_blocks_out_of_the_pooled_branch_in_training_only():
    from fbnet.augment import drop_units
    from fbnet.config import ConfigError, FBNetConfig, ModelConfig
    from fbnet.models.fbnet import GLOBAL, FBNet

    torch.manual_seed(0)
    mask = (torch.rand(500, 40) > 0.3).float()
    mask[:, 0] = 1
    kept = drop_units(mask, 0.2)
    assert (kept <= mask).all() and (kept.sum(1) >= 1).all()
    assert 0.15 < 1 - kept.sum() / mask.sum() < 0.25
    assert (drop_units(mask, 0.999999)[:, 0] == 1).all() and drop_units(mask, 0.999999)[:, 1:].sum() < 5

    cfg = ModelConfig(embed_dim=32, word_dim=16, global_pool="max", block_dropout=0.5)
    model = FBNet(cfg, vocab_size=20, feature_dim=24)
    background, foreground = torch.randn(6, 14, 24), torch.randn(6, 3, 14, 24)
    fg_mask = torch.tensor([[1, 1, 0]] * 6, dtype=torch.bool)
    pooled = lambda: model.encode_images(background, foreground, fg_mask)[GLOBAL][0]  # noqa: E731
    model.eval()
    assert torch.equal(pooled(), pooled())  # evaluation pools every block
    model.train()
    assert not torch.equal(pooled(), pooled())  # training draws which blocks
    with pytest.raises(ConfigError, match="block_dropout.*global_pool"):
        FBNetConfig.from_dict({"model": {"block_dropout": 0.2}})
