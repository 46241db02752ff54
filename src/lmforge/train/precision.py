"""S1: mixed precision. Weights, gradients and optimizer state stay fp32 (the master copy);
`bf16` and `fp16` run the forward and backward under autocast. fp16's narrow range needs dynamic
loss scaling (torch's GradScaler): the loss is multiplied by a scale before backward, gradients are
unscaled before clipping, and a step whose gradients overflowed is skipped while the scale halves;
it doubles again after `growth_interval` clean steps. An overflow is the scaler's business, not a
divergence: the trainer skips that update instead of rolling back.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name == "fp16" and device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
            raise RuntimeError("train.precision=fp16 needs torch.amp.GradScaler")
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: Any) -> None:
        """Gradients back to their true size, before they are measured and clipped."""
        if self.scaler is not None:
            for part in getattr(optimizer, "parts", [optimizer]):
                self.scaler.unscale_(part)

    def overflowed(self, grad_norm: float) -> bool:
        """fp16 only: non-finite gradients are an overflow of the loss scale."""
        return self.scaler is not None and not math.isfinite(grad_norm)

    def step(self, optimizer: Any) -> None:
        """The optimizer step (skipped by the scaler after an overflow), then the scale update."""
        if self.scaler is None:
            optimizer.step()
            return
        for part in getattr(optimizer, "parts", [optimizer]):
            self.scaler.step(part)
        self.scaler.update()

    @property
    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scaler.state_dict()) if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
