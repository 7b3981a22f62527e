"""Training curves: a run's ``log.jsonl`` drawn to ``curves.png`` after every epoch, and, with
``train.tensorboard: true``, the same scalars (and the per-step loss) written for TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_write

#: what each panel shows, from the epoch records of ``log.jsonl``
PANELS = (("loss", "training loss"), ("val_map", "validation MAP"), ("val_rsum", "validation R@sum"),
          ("lr", "learning rate"))


def epoch_records(log: Path) -> list[dict]:
    """The epoch records of a run's log, one per epoch (a resumed run's later record wins)."""
    records = {}
    for line in Path(log).read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "epoch":
            records[event["epoch"]] = event
    return [records[e] for e in sorted(records)]


def plot_curves(log: Path, path: Path) -> Path:
    """Draw loss, validation MAP, validation R@sum and learning rate per epoch into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = epoch_records(log)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    epochs = [r["epoch"] for r in records]
    for ax, (key, title) in zip(axes, PANELS):
        ax.plot(epochs, [r.get(key, float("nan")) for r in records], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.set_yscale("log")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
    return path


class TensorBoard:
    """Scalars for TensorBoard under ``<run>/tensorboard`` (needs the ``tensorboard`` package:
    ``pip install fbnet[tensorboard]``)."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.tensorboard is true but the tensorboard package is not installed: "
                              "pip install 'fbnet[tensorboard]' (or set train.tensorboard: false)") from None
        self.writer = SummaryWriter(str(Path(out) / "tensorboard"))

    def step(self, step: int, loss: float) -> None:
        self.writer.add_scalar("train/step_loss", loss, step)

    def epoch(self, record: dict) -> None:
        for key, _ in PANELS:
            if key in record:
                self.writer.add_scalar(f"epoch/{key}", record[key], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
