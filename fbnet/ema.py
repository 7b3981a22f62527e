"""An exponential moving average of the trained weights (``train.ema_decay``), what validation,
``best.pt`` and everything downstream of it use when it is on.

After every optimisation step each floating-point tensor of the averaged modules' state moves
towards the trained one: ``avg <- avg + (1 - d_t) (w - avg)`` with ``d_t = min(decay, (1 + t) /
(10 + t))`` after ``t`` steps, the bias-corrected warm-up of TensorFlow's
``ExponentialMovingAverage`` and timm's ``ModelEmaV2``, so the first steps are not tied to the
initial weights. Polyak-Ruppert averaging of the iterates, not one of the papers' methods: a
training knob of this toolkit (BENCHMARKS.md, "Flickr8k accuracy").
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class WeightAverage:
    """The moving average of ``modules``' floating-point parameters and buffers (integer buffers,
    such as BatchNorm's batch counts, are left as they are). It holds the modules' own tensors,
    which the optimiser updates in place, and moves its copies towards them."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an average's decay must lie in (0, 1), not {decay}")
        self.decay, self.steps = decay, 0
        self.live = {name: {k: v for k, v in m.state_dict(keep_vars=True).items() if v.is_floating_point()}
                     for name, m in modules.items()}
        self.average = {name: {k: v.detach().clone() for k, v in tensors.items()}
                        for name, tensors in self.live.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One step's move of the average towards the modules' current weights."""
        self.steps += 1
        weight = 1.0 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        for name, tensors in self.live.items():
            for key, live in tensors.items():
                self.average[name][key].lerp_(live, weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The modules hold the averaged weights inside the block, their trained ones again after it."""
        trained = {name: {k: v.detach().clone() for k, v in tensors.items()} for name, tensors in self.live.items()}
        try:
            self._copy_into_modules(self.average)
            yield
        finally:
            self._copy_into_modules(trained)

    @torch.no_grad()
    def _copy_into_modules(self, weights: dict) -> None:
        for name, tensors in self.live.items():
            for key, live in tensors.items():
                live.copy_(weights[name][key])

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for name, tensors in state["average"].items():
            for key, value in tensors.items():
                self.average[name][key].copy_(value)
