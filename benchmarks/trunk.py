"""An ensemble's shared trunk (``fbnet.export.trunk``): its image query with every member running its
own CNN against one pass of the modules the members compute alike, in one run.

    python benchmarks/trunk.py --ensemble runs/ensemble.yaml [--bundle runs/ensemble-bundle]

Exports the ensemble bundle when it is missing, then, on one real photo of the first member's
validation split:

* the image encoding's parts (p50): detection and window boxes (shared by members with one
  detector), the shared trunk, and each member's image encoder, on the photo and from the trunk's map;
* text and image query p50 at ``--items`` (10,000) synthetic images and captions of the members'
  shapes in every store of ``--stores`` (two-stage, K = ``--shortlist``, encoding included): the
  first member alone, the ensemble with every member's own CNN, and the ensemble on the shared trunk.

A query's cost does not depend on the members' weights (the detector and the frozen modules are
the recipes' own), so members trained briefly on a slice of the data measure the same cost as the
converged ones. The table goes to BENCHMARKS.md, "Ensemble image query: shared trunk".
"""

from __future__ import annotations

import sys

import numpy as np

from fbnet.preprocess import load_image
from fbnet.runtime.engine.ensemble import TRUNK, EnsembleRetriever, member_folder, shared_graph_name

from common import machine, shown, timeit, write_section
from ensemble import (cost_header, cost_row, ensemble_args, gallery_bytes, open_ensemble_args, query_times,
                      synthetic_ensemble)

HEADING = "## Ensemble image query: shared trunk"


def encoding_rows(shared: EnsembleRetriever, photo: np.ndarray, repeats: int) -> list[str]:
    """p50 of each part of one photo's encoding, own path against the shared one."""
    canvas = photo[None]
    feeds, maps = shared.member_feeds(canvas), shared.trunk_maps(canvas)
    record = shared.bundle.manifest.trunk
    detect = timeit(lambda: shared.members[0].image_encoder_feeds(canvas), repeats, 3)["median"]
    trunk = timeit(lambda: shared.trunk.run(TRUNK, {"image": canvas}), repeats, 3)["median"]
    rows = ["| part | own CNN p50 ms | shared trunk p50 ms |", "| --- | ---: | ---: |",
            f"| detection and window boxes (once per detector) | {detect:.1f} | {detect:.1f} |",
            f"| shared trunk: modules 0-{max(record.modules.values()) - 1} of member "
            f"{record.reference.removeprefix('member')}'s CNN, once | | {trunk:.1f} |"]
    for i, m in enumerate(shared.members):
        f = feeds[m.boxes_key]
        own = timeit(lambda: m.encode_feeds(f), repeats, 3)["median"]
        if i in shared.trunk_inputs:
            start = shared.trunk_inputs[i]
            fed = {"lower": maps[start], "block_boxes": f["block_boxes"], "fg_mask": f["fg_mask"]}
            from_map = timeit(lambda: shared.trunk.run(shared_graph_name(i), fed), repeats, 3)["median"]
            label = (f"member {i} ({m.bundle.model.name}) image encoder; shared from module "
                     f"{record.modules[member_folder(i)]}")
            rows.append(f"| {label} | {own:.1f} | {from_map:.1f} |")
        else:
            rows.append(f"| member {i} ({m.bundle.model.name}) image encoder; not shared | {own:.1f} | {own:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = ensemble_args(__doc__.split("\n\n")[0], "bench-trunk", 50)
    ap.add_argument("--note", default="", help="what the members are, for the section's text")
    args = ap.parse_args()
    ensemble, bundle, members, dataset = open_ensemble_args(args)
    if bundle.manifest.trunk is None:
        sys.exit(f"{bundle.root}: the members share no CNN modules (no trunk in ensemble.json); nothing to compare")
    shared, own = EnsembleRetriever(bundle, members), EnsembleRetriever(bundle, members, share_trunk=False)
    photo = load_image(dataset.split("val")[0].image, bundle.canvas)

    lines = [HEADING, "",
             f"`python benchmarks/trunk.py --ensemble {shown(args.ensemble)}` ({machine()}). "
             + (args.note + " " if args.note else "")
             + "Members: " + "; ".join(f"{i}: `{m.checkpoint}` ({b.model.name}) weight {m.weight:g}"
                                      for i, (m, b) in enumerate(zip(ensemble.members, bundle.members))) + ".",
             "", f"One photo's image encoding (p50 of {args.repeats}, ONNX Runtime, 2 threads):", ""]
    lines += encoding_rows(shared, photo, args.repeats)
    k = args.shortlist
    for store in args.stores.split(","):
        big, big_dir = synthetic_ensemble(bundle, args.items, args.work / "synthetic", store)
        sizes = gallery_bytes(big_dir, big.meta.members)
        n = len(big.images)
        lines += ["", f"At {args.items:,} images and captions, `{store}` store (synthetic features of the members' "
                  f"shapes; two-stage, K = {k}, p50 of {args.repeats}, encoding included):", ""]
        lead = query_times(members[0], big.members[0], photo, k, args.repeats)
        mine = query_times(own, big, photo, k, args.repeats)
        one = query_times(shared, big, photo, k, args.repeats)
        lines += [*cost_header(store), cost_row("first member alone", *lead, sizes[0] / n),
                  cost_row("ensemble, every member its own CNN", *mine, sum(sizes) / n),
                  cost_row("**ensemble, shared trunk**", *one, sum(sizes) / n), "",
                  f"Image query against the first member alone: {mine[1] / lead[1]:.2f}x with every member's own "
                  f"CNN, **{one[1] / lead[1]:.2f}x** on the shared trunk."]
    section = "\n".join(lines + [""])
    write_section(args.out, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
