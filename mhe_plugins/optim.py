"""Optimizers for sampled classifiers whose rows are mostly untouched in a step.

:class:`LazySGD` is SGD with momentum and weight decay that, for row-sparse gradients (``MHSHead(...,
sparse_grad=True)``), updates **only the rows present in the gradient**: a class group that was not sampled
keeps its weight and its momentum buffer unchanged (no decay, no momentum drift). Dense gradients touch every
row, i.e. plain ``torch.optim.SGD`` semantics (dampening 0).

:class:`LazyAdam` is Adam with the same row-lazy rule (TF's LazyAdam; torch's ``SparseAdam``) and a
memory-lean state for 10^7-row classifiers: moments in bf16 (stochastic rounding, so the small EMA updates
are not rounded away), or a factorised second moment (one value per row, ``rowwise=True``) and no first
moment (``betas[0] = 0``). State bytes per parameter: 8 (fp32), 4 (bf16), ~0 (rowwise, beta1 = 0).
"""

from __future__ import annotations

import torch

__all__ = ["LazySGD", "LazyAdam", "state_bytes", "stochastic_round_bf16"]


def _rows(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(p as (rows, cols), sorted row ids of a row-sparse gradient or None for dense, grad values (n, cols))."""
    flat = p.view(p.shape[0], -1)
    g = p.grad
    if g.is_sparse:
        idx, vals = g._indices()[0], g._values()
        # MHSHead's gradients have sorted unique rows already (autograd drops the coalesced flag):
        # coalescing would sort and copy every value for nothing
        if not g.is_coalesced() and not bool((idx[1:] > idx[:-1]).all()):
            g = g.coalesce()
            idx, vals = g.indices()[0], g.values()
        return flat, idx, vals.reshape(-1, flat.shape[1]).to(p.dtype)
    return flat, None, g.reshape(flat.shape)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down at random with the probability of the distance (unbiased), so an
    EMA whose per-step change is below bf16's resolution still moves on average."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def state_bytes(opt: torch.optim.Optimizer, params=None) -> int:
    """Bytes of the optimizer state tensors (of ``params`` only, when given)."""
    keep = None if params is None else {id(p) for p in params}
    total = 0
    for p, st in opt.state.items():
        if keep is not None and id(p) not in keep:
            continue
        total += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
    return total


class _PerParameterOptimizer(torch.optim.Optimizer):
    """``step`` = ``_update(p, group)`` for every parameter with a gradient (dense or row-sparse)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError


class LazySGD(_PerParameterOptimizer):
    """Row-lazy SGD (momentum, optional Nesterov, L2 weight decay) for embedding-like parameters (dim 0 = rows)."""

    def __init__(
        self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"invalid LazySGD hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, mom, wd, nest = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        flat, idx, vals = _rows(p)
        if idx is not None and idx.numel() == 0:
            return
        rows = flat if idx is None else flat.index_select(0, idx)
        if wd:
            vals = vals + wd * rows
        if mom:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"].view(flat.shape)
            if idx is None:
                buf.mul_(mom).add_(vals)
                b = buf
            else:
                b = buf.index_select(0, idx).mul_(mom).add_(vals)
                buf.index_copy_(0, idx, b)
            vals = vals + mom * b if nest else b
        if idx is None:
            flat.add_(vals, alpha=-lr)
        else:
            flat.index_add_(0, idx, vals, alpha=-lr)


class LazyAdam(_PerParameterOptimizer):
    """Row-lazy Adam (decoupled weight decay, as AdamW) for embedding-like parameters (dim 0 = rows).

    A row-sparse gradient updates only its rows: their moments, then their weights; the other rows keep
    weight and moments unchanged (no decay). Bias correction uses the parameter's step count (every step
    it had a gradient), as ``torch.optim.SparseAdam``. Dense gradients update every row (Adam).

    - ``state_dtype=torch.bfloat16``: both moments in bf16, written back with stochastic rounding and
      computed in fp32 (half the state of fp32 Adam);
    - ``rowwise=True``: the second moment is one value per row (the mean of the squared gradient over the
      row: FBGEMM's row-wise Adagrad/Adam), fp32; with ``betas[0] == 0`` no first moment is kept either.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype = torch.float32,
        rowwise: bool = False,
    ):
        b1, b2 = (float(b) for b in betas)
        if lr < 0 or eps <= 0 or weight_decay < 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"invalid LazyAdam hyper-parameters lr={lr}, betas={betas}, eps={eps}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=(b1, b2),
                eps=eps,
                weight_decay=weight_decay,
                state_dtype=state_dtype,
                rowwise=rowwise,
            ),
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``Optimizer.load_state_dict``, which casts every float state to the parameter's dtype: the
        moments go back to ``state_dtype`` (a resumed bf16 state would otherwise double in size)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st and not (group["rowwise"] and key == "exp_avg_sq"):
                        st[key] = st[key].to(group["state_dtype"])

    def _state(self, p: torch.Tensor, flat: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            dtype = group["state_dtype"]
            state["step"] = torch.zeros((), dtype=torch.float64)
            if group["betas"][0] > 0:
                state["exp_avg"] = torch.zeros(flat.shape, dtype=dtype, device=p.device)
            shape = (flat.shape[0], 1) if group["rowwise"] else flat.shape
            state["exp_avg_sq"] = torch.zeros(
                shape, dtype=torch.float32 if group["rowwise"] else dtype, device=p.device
            )
        return state

    @staticmethod
    def _read(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """fp32 rows of a state tensor: the tensor itself (updated in place) for a dense fp32 state."""
        rows = t if idx is None else t.index_select(0, idx)
        return rows.float() if rows.dtype != torch.float32 else rows

    @staticmethod
    def _write(t: torch.Tensor, idx: torch.Tensor | None, value: torch.Tensor) -> None:
        if value is t:
            return
        if t.dtype == torch.bfloat16:
            value = stochastic_round_bf16(value)
        if idx is None:
            t.copy_(value)
        else:
            t.index_copy_(0, idx, value)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        flat, idx, g = _rows(p)
        if idx is not None and idx.numel() == 0:
            return
        g = g.float()
        state = self._state(p, flat, group)
        state["step"] += 1
        t = float(state["step"])
        v = self._read(state["exp_avg_sq"], idx)
        sq = g.square().mean(1, keepdim=True) if group["rowwise"] else g.square()
        v.mul_(b2).add_(sq, alpha=1 - b2)
        self._write(state["exp_avg_sq"], idx, v)
        if b1 > 0:
            m = self._read(state["exp_avg"], idx).mul_(b1).add_(g, alpha=1 - b1)
            self._write(state["exp_avg"], idx, m)
        else:
            m = g
        denom = (v / (1 - b2**t)).sqrt_().add_(eps)
        upd = (m / denom).mul_(lr / (1 - b1**t) if b1 > 0 else lr)
        if wd:
            rows = flat if idx is None else flat.index_select(0, idx)
            upd = upd.add_(rows.float(), alpha=lr * wd)
        if idx is None:
            flat.sub_(upd.to(flat.dtype))
        else:
            flat.index_add_(0, idx, upd.to(flat.dtype), alpha=-1.0)
