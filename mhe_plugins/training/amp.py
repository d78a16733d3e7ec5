"""Mixed precision the same way in every trainer: fp16 + GradScaler on CUDA, optional bf16 on CPU."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["Amp"]


class Amp:
    """``autocast()`` for the forward pass and ``backward``/``step`` that go through a GradScaler when needed.

    ``enabled`` asks for mixed precision; on CUDA that is fp16 with loss scaling, on CPU bf16 only when
    ``cpu_bf16`` (CPU fp16 is slow and bf16 needs no scaler), otherwise full precision.
    """

    def __init__(
        self, device: torch.device, enabled: bool, cpu_bf16: bool = False, growth_interval: int = 2000
    ):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.enabled = bool(enabled) and (cuda or cpu_bf16)
        self.dtype = torch.float16 if cuda else torch.bfloat16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.enabled and cuda, growth_interval=growth_interval
        )

    def autocast(self) -> AbstractContextManager:
        if not self.enabled:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(
        self,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        clip: tuple[Iterable[torch.nn.Parameter], float] | None = None,
    ) -> None:
        """Optionally clip (after unscaling the first optimizer), step every optimizer, update the scale."""
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if clip is not None and clip[1]:
            self.scaler.unscale_(opts[0])
            torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
        for opt in opts:
            self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.scaler.load_state_dict(state)
