"""An ensemble's shared trunk: the CNN modules several members compute alike, run once per photo.

The members of the Flickr8k ensemble all pool blocks from ImageNet MobileNetV2: the related models
(SCAN, DSRLN, RGF) freeze all 19 of its modules, the stride-32 recipe its first 17 (it fine-tunes
the last two), the stride-16 recipe the same 17 but with the last stride-2 stage dilated from module
14 on. Run as exported, each member's image encoder runs its own copy, so a photo passes through
MobileNetV2's first 14 modules five times. :func:`plan_trunk` finds, for every member, how many
leading modules it computes exactly as one reference member does (:func:`~.graphs.trunk_prefix`:
equal weights and geometry, inside its frozen part), choosing the reference that shares the most;
:func:`export_trunk` writes

* ``trunk.onnx``: ``image`` -> the reference's map after each member's cut (``lower_<cut>``), the
  modules between two cuts run once (:class:`~.graphs.TrunkGraph`);
* ``member<i>_image_encoder.onnx`` for each sharing member: its image encoder from its cut on
  (:class:`~.graphs.ImageEncoderGraph` with ``shared=cut``), with its inputs, outputs and dynamic
  axes otherwise the member's own ``image_encoder``;

each checked against PyTorch as every bundle graph is (:func:`~.bundle.export_checked`), and
recorded in ``ensemble.json`` (:class:`~fbnet.runtime.engine.manifest.SharedTrunk`). The member
bundles stay whole (each still runs alone); :class:`~fbnet.runtime.engine.ensemble.EnsembleRetriever`
takes the shared path. Members whose detector already shares its map with the image encoder (the
distilled head) keep their own path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fbnet.checkpoint import as_exported, load_checkpoint
from fbnet.evaluate import load_model
from fbnet.pipeline import frozen_from_checkpoint
from fbnet.runtime.engine.bundle import sha256
from fbnet.runtime.engine.ensemble import TRUNK, member_folder, shared_graph_name, trunk_output
from fbnet.runtime.engine.manifest import SharedTrunk

from .bundle import export_checked, sample_inputs
from .graphs import ImageEncoderGraph, TrunkGraph, graph_io, shared_stage, trunk_prefix

@dataclass
class TrunkPlan:
    #: the member whose trunk the graph runs
    reference: int
    #: member -> how many leading modules it shares (only members that share any)
    cuts: dict[int, int]


def plan_trunk(encoders: list) -> TrunkPlan | None:
    """The members' shared trunk: ``encoders[i]`` is member i's block encoder, or None where it
    cannot share (see the module doc). The reference is the member with the most modules shared
    in all (the first on ties); None when fewer than two members would share."""
    best = None
    for r, ref in enumerate(encoders):
        if ref is None:
            continue
        cuts = {i: trunk_prefix(ref, e) for i, e in enumerate(encoders) if e is not None}
        cuts = {i: c for i, c in cuts.items() if c > 0}
        if len(cuts) >= 2 and (best is None or sum(cuts.values()) > sum(best.cuts.values())):
            best = TrunkPlan(r, cuts)
    return best


def export_trunk(checkpoints: list[Path], root: Path, opset: int, log=print) -> SharedTrunk | None:
    """Plan the shared trunk of the ensemble whose member checkpoints are ``checkpoints`` and write
    its graphs into the ensemble bundle folder ``root``; None (nothing written) when the members
    share no CNN modules."""
    members = []
    for path in checkpoints:
        ckpt = as_exported(load_checkpoint(path), {}, path)
        cfg, model, _, _ = load_model(ckpt)
        detector, encoder = frozen_from_checkpoint(cfg, ckpt)
        members.append((ckpt, cfg, model, detector, encoder))
    plan = plan_trunk([None if shared_stage(d, e) is not None else e for _, _, _, d, e in members])
    if plan is None:
        log("shared trunk: the members share no CNN modules; each image encoder runs its own")
        return None
    ckpt, cfg, _, detector, encoder = members[plan.reference]
    trunk = TrunkGraph(encoder, list(plan.cuts.values())).eval()
    outputs = [trunk_output(c) for c in trunk.cuts]
    log(f"shared trunk: member {plan.reference}'s first {max(trunk.cuts)} modules, once per photo; "
        + ", ".join(f"member {i} from module {c}" for i, c in sorted(plan.cuts.items())))
    images = sample_inputs(ckpt, cfg, detector)[0]
    io = {"inputs": ["image"], "outputs": outputs, "dynamic": {n: {0: "images"} for n in ["image", *outputs]}}
    checks, specs = {}, {}
    checks[TRUNK], specs[TRUNK] = export_checked(root, TRUNK, trunk, (images,), io, opset, log)
    with torch.no_grad():
        maps = dict(zip(trunk.cuts, trunk(images)))
    for i, cut in sorted(plan.cuts.items()):
        ckpt, cfg, model, detector, encoder = members[i]
        _, block_boxes, fg_mask, _, _ = sample_inputs(ckpt, cfg, detector)
        graph = ImageEncoderGraph(encoder, model, cut).eval()
        name = shared_graph_name(i)
        checks[name], specs[name] = export_checked(root, name, graph, (maps[cut], block_boxes, fg_mask),
                                                   graph_io(model, shared=True)["image_encoder"], opset, log)
    files = {p.name: sha256(p) for s in specs.values()
             for p in (root / s.file, root / s.ort_optimized.file)}
    return SharedTrunk(graphs=specs, files=files, modules={member_folder(i): c for i, c in plan.cuts.items()},
                       reference=member_folder(plan.reference), export_check=checks)
