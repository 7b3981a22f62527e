"""An ensemble's shared trunk (:mod:`fbnet.export.trunk`): which CNN modules members compute alike,
and that starting a member's encoder from the shared map gives its own block features. The
exported bundle, the runtime's shared path and parity on real photos are in ``test_flickr8k.py``."""

import torch

from conftest import mobilenet_encoder
from fbnet.export.graphs import TrunkGraph, trunk_prefix
from fbnet.export.trunk import plan_trunk


def test_trunk_prefix_stops_at_fine_tuned_dilated_and_foreign_modules():
    frozen, top, dilated = mobilenet_encoder(k=0), mobilenet_encoder(k=2), mobilenet_encoder(k=2, output_stride=16)
    other = mobilenet_encoder(k=0, seed=2)
    assert trunk_prefix(frozen, frozen) == 19
    assert trunk_prefix(frozen, top) == 17           # the fine-tuned top is the member's own
    assert trunk_prefix(frozen, dilated) == 14       # module 14 is the last stride-2 stage: dilated from there on
    assert trunk_prefix(top, frozen) == 19           # a top not yet moved computes what the frozen modules do
    with torch.no_grad():
        top.trunk[17].conv[0][0].weight.add_(1e-3)  # training moved it: its modules are its own
    assert trunk_prefix(frozen, top) == 17 and trunk_prefix(top, frozen) == 17
    assert trunk_prefix(frozen, other) == 0          # other weights share nothing


def test_plan_takes_the_reference_that_shares_most_and_skips_what_cannot_share():
    frozen, top, dilated = mobilenet_encoder(k=0), mobilenet_encoder(k=2), mobilenet_encoder(k=2, output_stride=16)
    with torch.no_grad():
        top.trunk[17].conv[0][0].weight.add_(1e-3)
    plan = plan_trunk([dilated, top, None, frozen, mobilenet_encoder(k=0, seed=2)])
    assert plan.reference == 3 and plan.cuts == {0: 14, 1: 17, 3: 19}
    assert plan_trunk([frozen, None, mobilenet_encoder(k=0, seed=2)]) is None  # nobody to share with


def test_encoders_started_from_the_shared_maps_give_their_own_features():
    frozen, top, dilated = mobilenet_encoder(k=0), mobilenet_encoder(k=2), mobilenet_encoder(k=2, output_stride=16)
    with torch.no_grad():
        for m in (top, dilated):
            m.trunk[17].conv[0][0].weight.mul_(1.5)
    cuts = {frozen: 19, top: 17, dilated: 14}
    graph = TrunkGraph(frozen, list(cuts.values()))
    assert graph.cuts == [14, 17, 19]
    images = torch.rand(2, 3, 96, 96)
    boxes = torch.tensor([[[0, 0, 96, 96], [10, 20, 60, 90], [40, 8, 95, 50]]] * 2, dtype=torch.float32)
    with torch.no_grad():
        maps = dict(zip(graph.cuts, graph(images)))
        for enc, cut in cuts.items():
            own = enc(images, boxes)
            shared = enc.pool_blocks(enc.trunk[cut: enc.split_at](maps[cut]), boxes)
            assert torch.allclose(shared, own, rtol=1e-5, atol=1e-5 * float(own.abs().max()))
