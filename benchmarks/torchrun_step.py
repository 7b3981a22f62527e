"""Step time of training on torchrun against one process, same global batches.

Random features and captions of the recipe's shapes (``benchmarks/training.py``'s
``random_step_seconds``), the recipe's batch of 64 pairs: one process with every core's threads,
against ``--nproc`` gloo processes started by ``torchrun`` on loopback, each with its share of the
threads. On a CPU host this shows what the gathers and the gradient all-reduce cost; on a GPU
host (``--device cuda``) each process takes one GPU.

    python benchmarks/torchrun_step.py               # writes "Training on torchrun" in BENCHMARKS.md

Nothing else may run beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine, write_section

BOX_PROBS = "0.338,0.247,0.167,0.099,0.064,0.038,0.024,0.013,0.010"  # recipe's share of 1..9 boxes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    """One process of the group (or the single process): its median step, printed by rank 0."""
    import torch

    from fbnet.distributed import destroy, from_env
    from training import random_step_seconds

    group = from_env(torch.device(args.device))
    step = random_step_seconds(args.config, args.device if group is None or args.device == "cpu"
                               else f"cuda:{group.local_rank}", args.steps,
                               [float(x) for x in BOX_PROBS.split(",")], group=group)
    if group is None or group.main:
        print(json.dumps({"step_s": step}))
    destroy(group)


def run(nproc: int, threads: int, args) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    me = [str(Path(__file__).resolve()), "--worker", "--device", args.device, "--steps", str(args.steps),
          "--config", str(args.config)]
    cmd = ([sys.executable, *me] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *me])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT / "benchmarks", timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["step_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "flickr8k.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cores = os.cpu_count() or 1
    setups = {f"1 process, {cores} threads": (1, cores),
              f"{args.nproc} gloo processes (torchrun), {max(1, cores // args.nproc)} thread(s) each":
                  (args.nproc, max(1, cores // args.nproc))}
    times = {name: [] for name in setups}
    for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits both alike
        for name, (nproc, threads) in setups.items():
            times[name].append(run(nproc, threads, args))
            print(f"{name}: {times[name][-1] * 1000:.0f} ms/step")
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    one = next(iter(med.values()))
    lines = ["## Training on torchrun", "",
             f"`python benchmarks/torchrun_step.py` on {machine()}, device {args.device}. Random features and "
             f"captions of `{args.config.relative_to(ROOT)}`'s shapes, its global batch of 64 pairs; the median "
             f"of {args.steps} steps after a warm-up, {args.repeats} runs of each, alternating (median; range).", "",
             "| setup | ms / step | against one process |", "| --- | --- | --- |"]
    for name, t in times.items():
        lines.append(f"| {name} | {med[name] * 1000:.0f} ({min(t) * 1000:.0f}-{max(t) * 1000:.0f}) | "
                     f"{one / med[name]:.2f}x |")
    write_section(args.out, "## Training on torchrun", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
