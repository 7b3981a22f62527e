"""Fine-tuning the backbone's top: the cached-activation path against the full backbone, and the
pooled global branch's GPO against a hand computation."""

import numpy as np
import pytest
import torch

from conftest import assert_encoder_cut_to_used_boxes_is_exact, mobilenet_encoder
from fbnet.activations import ActivationFeatures, extract_activations, view_boxes
from fbnet.config import BackboneConfig, FBNetConfig
from fbnet.data.manifest import Item, load_dataset
from fbnet.features import compute_features
from fbnet.models.backbone import BlockEncoder, roi_align_weights
from fbnet.models.pooling import GPO, MaxPool, MeanPool, sorted_units


def _images(tmp_path, n=5, size=96):
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        items.append(Item(id=str(i), image=path, captions=["a"], split="train"))
    return items


@pytest.mark.parametrize("output_stride", [32, 16])
def test_encoder_split_is_the_full_backbone(output_stride):
    enc = mobilenet_encoder(output_stride=output_stride)
    assert enc.split_at == len(enc.trunk) - 2 and enc.stride == output_stride
    images = torch.rand(2, 3, 96, 96)
    assert enc.lower(images).shape[-2:] == (96 // output_stride, 96 // output_stride)
    boxes = torch.tensor([[[0, 0, 96, 96], [10, 20, 60, 90]]] * 2, dtype=torch.float32)
    assert torch.allclose(enc(images, boxes), enc.pool_blocks(enc.lower(images), boxes), atol=1e-6)
    assert all(not p.requires_grad for p in enc.parameters())  # frozen until training asks


def test_output_stride_16_is_the_dilated_trunk():
    """Output stride 16 keeps the weights and changes only the last stride-2 convolution (now
    stride 1) and the 3x3 convolutions after it (dilation 2, so each keeps its receptive field
    over the input)."""
    plain, dilated = mobilenet_encoder(), mobilenet_encoder(output_stride=16)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dilated.state_dict().values()))
    changed = [(name, m.stride, m.dilation) for (name, m), (_, p) in zip(dilated.trunk.named_modules(),
                                                                         plain.trunk.named_modules())
               if isinstance(m, torch.nn.Conv2d) and (m.stride, m.dilation) != (p.stride, p.dilation)]
    assert changed == [("14.conv.1.0", (1, 1), (1, 1)), ("15.conv.1.0", (1, 1), (2, 2)),
                       ("16.conv.1.0", (1, 1), (2, 2)), ("17.conv.1.0", (1, 1), (2, 2))]


@pytest.mark.parametrize("pool,ratio", [(2, 2), (1, 2), (6, 2), (2, 3)])
def test_roi_align_weights_are_torchvisions_roi_align(pool, ratio):
    """Block pooling as a product with RoIAlign's separable weights gives torchvision's RoIAlign
    (aligned), for boxes inside, across and beyond the map's edges and degenerate ones."""
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    fmap = torch.randn(2, 5, 7, 9)
    corners = torch.rand(2, 30, 2, 2) * 360 - 40  # canvas 288 x 224 at stride 32, and beyond it
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 288.0, 224.0])  # the whole canvas
    boxes[0, 1] = torch.tensor([100.0, 50.0, 100.0, 50.0])  # a point
    rois = torch.cat([torch.arange(2.0).repeat_interleave(30)[:, None], boxes.reshape(-1, 4)], dim=1)
    ref = roi_align(fmap, rois, output_size=(pool, pool), spatial_scale=1 / 32, sampling_ratio=ratio,
                    aligned=True)  # (60, C, pool, pool)
    weights = roi_align_weights(boxes, 7, 9, 1 / 32, pool, ratio)  # (N, K, pool**2, 63)
    got = torch.einsum("nkbs,ncs->nkcb", weights, fmap.reshape(2, 5, 63)).reshape(60, 5, pool, pool)
    assert torch.allclose(got, ref, atol=1e-5)


def test_cached_activations_equal_the_full_backbone(tmp_path):
    """The same block features (float16 cache tolerance) from cached lower activations + the top
    as from :func:`compute_features`, which runs the whole backbone on each image."""
    items = _images(tmp_path)
    enc = mobilenet_encoder()
    full = compute_features(items, enc, None, image_size=96, levels=3, max_boxes=2, batch_size=2)
    lower, blocks, mask = extract_activations(items, enc, None, image_size=96, levels=3, max_boxes=2,
                                              views=("identity", "hflip"), cache=tmp_path / "cache", key="k")
    assert lower.dtype == np.float16 and lower.shape[:2] == (5, 2)
    cached = ActivationFeatures(lower, blocks, mask, enc, levels=3, canvas=96)
    with torch.no_grad():
        bg, fg, m, _ = cached.tensors(slice(None))
    ref_bg, ref_fg, ref_m, _ = full.tensors(slice(None))
    scale = float(ref_bg.abs().max())
    assert torch.allclose(bg, ref_bg, atol=2e-3 * scale) and torch.allclose(fg, ref_fg, atol=2e-3 * scale)
    assert torch.equal(m, ref_m)
    # the mirrored view's boxes are the identity view's, mirrored
    assert np.allclose(blocks[:, 1], view_boxes(torch.from_numpy(np.array(blocks[:, 0])), "hflip", 96).numpy())
    # a changed key rebuilds the cache instead of reusing it
    again = extract_activations(items, mobilenet_encoder(k=1), None, image_size=96, levels=3, max_boxes=2,
                                views=("identity",), cache=tmp_path / "cache", key="other")
    assert again[0].shape[1] == 1 and again[0].shape[2] != lower.shape[2]


def test_top_gets_gradients_through_the_cache(tmp_path):
    items = _images(tmp_path, n=2)
    enc = mobilenet_encoder()
    arrays = extract_activations(items, enc, None, image_size=96, levels=1, max_boxes=1, views=("identity",),
                                 cache=tmp_path / "c", key="k")
    enc.top().requires_grad_(True)
    bg, fg, _, _ = ActivationFeatures(*arrays, enc, levels=1, canvas=96).tensors([0, 1])
    (bg.sum() + fg.sum()).backward()
    assert all(p.grad is not None for p in enc.top().parameters())
    assert all(p.grad is None for p in enc.trunk[: enc.split_at].parameters())


def test_gpo_against_a_hand_computation():
    x = torch.tensor([[[1.0, 5.0], [3.0, 2.0], [7.0, 0.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third unit is padding
    assert torch.equal(sorted_units(x, mask), torch.tensor([[[3.0, 5.0], [1.0, 2.0], [0.0, 0.0]]]))
    gpo = GPO()
    theta = gpo.weights(mask)
    assert theta[0, 2] == 0 and torch.isclose(theta.sum(), torch.tensor(1.0))
    expected = theta[0, 0] * torch.tensor([3.0, 5.0]) + theta[0, 1] * torch.tensor([1.0, 2.0])
    assert torch.allclose(gpo(x, mask)[0], expected)
    # equal scores are average pooling; a dominant first score is max pooling
    torch.nn.init.zeros_(gpo.score.weight)
    assert torch.allclose(gpo(x, mask), torch.tensor([[2.0, 3.5]]))
    assert torch.allclose(MeanPool()(x, mask), torch.tensor([[2.0, 3.5]]))
    assert torch.allclose(MaxPool()(x, mask), torch.tensor([[3.0, 5.0]]))


def test_gpo_exported_form_equals_packed():
    """The exported form (padded GRU, reversal by gather) gives the packed form's weights."""
    torch.manual_seed(0)
    gpo = GPO()
    mask = torch.tensor([[1.0] * 5 + [0.0] * 3, [1.0] * 8, [1.0] * 2 + [0.0] * 6])
    assert torch.allclose(gpo.weights(mask), gpo.weights(mask, static_shapes=True), atol=1e-6)


def test_global_branch_projects_real_boxes_only_and_equals_every_slot_masked():
    """The global branch's image side skips padded box slots in training; it equals projecting
    every slot and letting GPO's mask drop the padded ones (the exported form, and the earlier code)."""
    import torch.nn.functional as F

    from fbnet.config import ModelConfig
    from fbnet.models.fbnet import FBNet

    torch.manual_seed(0)
    model = FBNet(ModelConfig(embed_dim=16, global_pool="gpo"), 50, 8)
    n, j, nb = 5, 9, 14
    background, foreground = torch.randn(n, nb, 8), torch.randn(n, j, nb, 8)
    fg_mask = (torch.arange(j)[None] < torch.tensor([0, 1, 3, 9, 5])[:, None]).float()
    units = torch.cat([background, foreground.reshape(n, j * nb, 8)], dim=1)
    mask = torch.cat([torch.ones(n, nb), fg_mask.repeat_interleave(nb, dim=1)], dim=1)
    every_slot = F.normalize(model.image_pool(model.proj["G"](F.normalize(units, dim=-1)), mask), dim=-1)
    for static in (False, True):
        pooled, _ = model._pooled_image(background, foreground, fg_mask, static)
        assert torch.allclose(pooled[:, 0], every_slot, atol=1e-6)


@pytest.mark.parametrize("bad", [{"model": {"backbone": {"trainable_blocks": -1}}},
                                 {"model": {"backbone": {"name": "detector", "trainable_blocks": 2}}},
                                 {"data": {"views": ["hflip"]}},
                                 {"model": {"global_pool": "median"}},
                                 {"model": {"backbone": {"name": "resnet18", "output_stride": 16}}},
                                 {"model": {"backbone": {"output_stride": 8}}}])
def test_bad_finetune_settings_are_refused(bad):
    from fbnet.config import ConfigError

    with pytest.raises(ConfigError):
        FBNetConfig.from_dict(bad).validate()


def test_an_interrupted_extraction_resumes(tmp_path):
    """A failure mid-way keeps the finished batches; the next call continues from them and gives
    what one uninterrupted extraction gives."""
    from fbnet.preprocess import ImageError

    items = _images(tmp_path, n=6)
    good = items[4].image.read_bytes()
    items[4].image.write_bytes(b"not an image")
    enc = mobilenet_encoder()
    args = dict(image_size=96, levels=1, max_boxes=1, views=("identity",), key="k", batch_size=2)
    with pytest.raises(ImageError):
        extract_activations(items, enc, None, cache=tmp_path / "cache", **args)
    partial = tmp_path / ".cache.k.partial"
    assert (partial / "done").read_text() == "4" and not (tmp_path / "cache").exists()
    items[4].image.write_bytes(good)
    resumed = extract_activations(items, enc, None, cache=tmp_path / "cache", **args)
    fresh = extract_activations(items, enc, None, cache=tmp_path / "fresh", **args)
    assert not partial.exists()
    for a, b in zip(resumed, fresh):
        assert np.array_equal(np.asarray(a), np.asarray(b))


FINETUNE_CONFIG = """
data: {{views: [identity, hflip]}}
model:
  embed_dim: 32
  global_pool: gpo
  backbone: {{name: mobilenet_v2, weights: {weights}, mode: roi, image_size: 64, trainable_blocks: 2,
             output_stride: {output_stride}}}
  detector: {{name: none}}
train: {{epochs: 2, batch_size: 16, lr: 0.001, backbone_frozen_epochs: 0, fusion_grid: [1.0], global_grid: [0.5, 1.0]}}
"""


@pytest.mark.parametrize("output_stride", [32, 16])
def test_finetuned_top_trains_exports_and_keeps_parity(tiny_synth, tmp_path, output_stride):
    """The fine-tuned top is saved in the checkpoint, differs from the initial weights only in the
    top, and the exported image encoder (the whole backbone, dilated at output stride 16) keeps
    parity with PyTorch."""
    from click.testing import CliRunner

    from fbnet.checkpoint import load_checkpoint
    from fbnet.cli import main

    # well-conditioned weights (torchvision's random init gives near-constant features, whose score
    # ties would make parity's ranking metrics flip on rounding)
    weights = tmp_path / "mobilenet.pth"
    torch.save({f"features.{k}": v for k, v in mobilenet_encoder().trunk.state_dict().items()}, weights)
    (tmp_path / "cfg.yaml").write_text(FINETUNE_CONFIG.format(weights=weights, output_stride=output_stride))
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--data", str(tiny_synth), "--config", str(tmp_path / "cfg.yaml"),
                               "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "mu=" in res.output and (tmp_path / "run" / "curves.png").stat().st_size > 0
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    start = BlockEncoder(BackboneConfig(name="mobilenet_v2", weights=str(weights), image_size=64,
                                        trainable_blocks=2, output_stride=output_stride)).state_dict()
    changed = {k for k, v in ckpt["encoder"].items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith(("trunk.17.", "trunk.18.")) for k in changed), sorted(changed)[:5]
    res = runner.invoke(main, ["export", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "bundle")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["parity", str(tmp_path / "run" / "best.pt"), str(tmp_path / "bundle"),
                               "--split", "test", "--backend", "onnxruntime"])
    assert res.exit_code == 0 and "PASS" in res.output, res.output
    photos = [it.image for it in load_dataset(tiny_synth).split("test")]
    assert_encoder_cut_to_used_boxes_is_exact(tmp_path / "bundle", photos)
    _first_stage_ranks_the_global_branch(tiny_synth, tmp_path / "bundle", tmp_path / "gallery")


def _first_stage_ranks_the_global_branch(data, bundle_dir, out):
    """A gallery of a model with the pooled global branch ranks G1 in its first stage, says so in
    gallery.json, and two-stage search over every item equals exhaustive search; a gallery.json
    written before the key was recorded still ranks B1 (its saved indexes were built on B1)."""
    import json

    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery.build import build_gallery
    from fbnet.runtime.gallery.first_stage import pooled_images
    from fbnet.runtime.gallery.gallery import Gallery
    from fbnet.runtime.search.searcher import Searcher

    b = open_bundle(bundle_dir)
    r = Retriever(b, OnnxRuntimeBackend(b))
    items = load_dataset(data).split("test")
    build_gallery(r, [it.image for it in items], [it.captions[0] for it in items], out)
    g = Gallery(out, b)
    assert g.meta.first_stage_key == "G1" == g.first_stage_key
    assert np.allclose(pooled_images(g.image_features, g.first_stage_key), np.asarray(g.image_features.blocks["G1"])[:, 0])
    queries = r.encode_texts([it.captions[0] for it in items[:3]])
    staged = Searcher.for_gallery(r, g, len(items)).images_for(queries, 3)
    for a, e in zip(staged, Searcher.for_gallery(r, g, 0).images_for(queries, 3)):
        np.testing.assert_array_equal(a.index, e.index)
    meta = json.loads((out / "gallery.json").read_text())
    del meta["first_stage_key"]
    (out / "gallery.json").write_text(json.dumps(meta))
    legacy = Gallery(out, b)
    assert legacy.first_stage_key == "B1" and Searcher.for_gallery(r, legacy, 5).stage_key == "B1"


def test_output_stride_is_in_the_cache_key_only_when_it_is_not_the_default():
    """A cache made at output stride 32 is not reused at 16 (its maps are 7 x 7, not 14 x 14), and
    caches written before the option existed keep their keys."""
    from fbnet.pipeline import frozen_settings

    plain = FBNetConfig.from_dict({"model": {"backbone": {"trainable_blocks": 2}}})
    dilated = FBNetConfig.from_dict({"model": {"backbone": {"trainable_blocks": 2, "output_stride": 16}}})
    assert "output_stride" not in frozen_settings(plain)["backbone"]
    assert frozen_settings(dilated)["backbone"]["output_stride"] == 16
    assert frozen_settings(plain) != frozen_settings(dilated)
