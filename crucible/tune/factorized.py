"""Per-module precomputation for the tuner: everything of a merge that does not depend on the
tuned params is computed once, so a trial costs matrix products, never a factorization
(merge-math.md section 10.4, "Efficiency").

- bmm, matrix tensor: P0 = sum_t beta_t G_t = Q diag(Lambda) Q^T (one eigendecomposition),
  E = sum_t beta_t (tau_t - tau_a) G_t Q and tau_a are cached; for (rho, scale):
      lambda = rho * tr(P0) / d_in   (plus bmm's optional relative ridge),
      tau    = tau_a + (E diag(1 / (Lambda + lambda))) Q^T,
      W      = W0 + scale * tau,
  which is bmm.merge's (tau_a + correction) * scale with P^{-1} = Q (Lambda + lambda)^{-1} Q^T
  instead of a Cholesky solve. Non-matrix tensors (and 2-D tensors without activation
  Grams when the Gram needs them) are the anchor's output, fixed.
- task_arithmetic, ties: W = W0 + scale * delta, where delta is the method's own merge at
  scale 1 of the task vectors over a zero base (both apply scale as mixed * scale, then add
  the base, so this is their merge to the last bit).

Tensors come from the engine's contexts (crucible.engine.matrix_context for matrix
methods: nn.Linear layout, float64 where it fits; whole_context for elementwise ones) and
go back in the tensor's file layout (GPT-2 Conv1D weights transposed back).

`state()` / `module_from_state()` turn a module into CPU tensors plus JSON-safe fields and
back, bit for bit (tensors are held contiguous from the start, so a restored module's
matrix products take the same kernels as the original's): the trial fan-out
(crucible.tune.trials) stores them once for other workers.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from crucible.methods import bmm
from crucible.methods.base import MethodParams, TensorContext, check_context, is_matrix
from crucible.methods.registry import METHODS
from crucible.methods.regmean import check_weights
from crucible.spec import TUNABLE_PARAMS


class FactorizedModule(ABC):
    """One tensor, ready to be merged for any value of the tuned params."""

    # The attributes state() saves: tensors, and plain numbers (besides the base fields).
    TENSORS: tuple[str, ...] = ()
    NUMBERS: tuple[str, ...] = ()

    def __init__(
        self,
        name: str,
        defaults: Mapping[str, float],
        *,
        transposed: bool,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        # The tuned params' values when a trial does not give them (the tensor's own params).
        self.defaults = dict(defaults)
        self.transposed = transposed
        self.dtype = dtype

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of tensors this module holds (the stage's memory budget counts these)."""

    @abstractmethod
    def _merge(self, values: dict[str, float]) -> torch.Tensor:
        """The merged tensor in compute layout and dtype."""

    def merged(self, params: Mapping[str, float], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The merged tensor for these tuned params (missing ones take the defaults), in the
        tensor's file layout, contiguous, in `dtype` (default: the one chosen at build), on
        the compute device."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown tuned params {unknown}")
        merged = self._merge({**self.defaults, **{k: float(v) for k, v in params.items()}})
        if self.transposed:
            merged = merged.T
        return merged.to(dtype=dtype or self.dtype).contiguous()

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(this module's tensors on the CPU, its other fields as JSON-safe values):
        module_from_state(*state()) merges bit for bit as this module does."""
        tensors = {k: getattr(self, k).detach().to("cpu") for k in self.TENSORS}
        meta = {
            "class": type(self).__name__,
            "name": self.name,
            "defaults": self.defaults,
            "transposed": self.transposed,
            "dtype": str(self.dtype).removeprefix("torch."),
            **{k: getattr(self, k) for k in self.NUMBERS},
        }
        return tensors, meta


def module_from_state(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> FactorizedModule:
    """The module `state()` described, its tensors on `device`."""
    cls = _STATE_CLASSES[meta["class"]]
    dtype = getattr(torch, meta["dtype"])
    assert isinstance(dtype, torch.dtype)
    args = [tensors[k].to(device) for k in cls.TENSORS] + [meta[k] for k in cls.NUMBERS]
    return cls(meta["name"], *args, meta["defaults"], transposed=meta["transposed"], dtype=dtype)


def _held(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, so that a module restored from its state (saved contiguous) computes
    with the same memory layout, hence the same kernels and bits, as the original."""
    return t.contiguous()


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class FixedModule(FactorizedModule):
    """A tensor the tuned params do not change (bmm's non-matrix tensors: the anchor)."""

    TENSORS = ("value",)

    def __init__(self, name: str, value: torch.Tensor, defaults: Mapping[str, float], **kw: Any):
        super().__init__(name, defaults, **kw)
        self.value = _held(value)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.value)

    def _merge(self, values: dict[str, float]) -> torch.Tensor:
        return self.value


class ScaledModule(FactorizedModule):
    """W = W0 + scale * delta (task_arithmetic, ties; bmm when every Gram is zero)."""

    TENSORS = ("base", "delta")

    def __init__(
        self,
        name: str,
        base: torch.Tensor,
        delta: torch.Tensor,
        defaults: Mapping[str, float],
        **kw: Any,
    ):
        super().__init__(name, defaults, **kw)
        self.base = _held(base)
        self.delta = _held(delta)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.base, self.delta)

    def _merge(self, values: dict[str, float]) -> torch.Tensor:
        return self.base + self.delta * values["scale"]


class BmmModule(FactorizedModule):
    """bmm's MAP for any (rho, scale) from one eigendecomposition (module docstring)."""

    TENSORS = ("base", "tau_a", "evidence_q", "eigvecs", "eigvals")
    NUMBERS = ("trace", "ridge")

    def __init__(
        self,
        name: str,
        base: torch.Tensor,
        tau_a: torch.Tensor,
        evidence_q: torch.Tensor,
        eigvecs: torch.Tensor,
        eigvals: torch.Tensor,
        trace: float,
        ridge: float,
        defaults: Mapping[str, float],
        **kw: Any,
    ):
        super().__init__(name, defaults, **kw)
        self.base = _held(base)
        self.tau_a = _held(tau_a)
        self.evidence_q = _held(evidence_q)  # E = sum_t beta_t (tau_t - tau_a) G_t Q
        self.eigvecs = _held(eigvecs)  # Q
        self.eigvals = _held(eigvals)  # Lambda
        self.trace = trace  # tr(P0), as bmm.merge computes it
        self.ridge = ridge

    @property
    def nbytes(self) -> int:
        return _nbytes(self.base, self.tau_a, self.evidence_q, self.eigvecs, self.eigvals)

    def shift(self, rho: float) -> float:
        """What bmm.merge adds to P0's diagonal: lambda, then solve_right_spd's relative
        ridge on P0 + lambda I (eps * tr(P0 + lambda I) / d_in) when bmm's ridge > 0."""
        if not rho > 0:
            raise ValueError(f"{self.name}: rho must be > 0, got {rho}")
        d_in = self.base.shape[-1]
        lam = rho * self.trace / d_in
        if self.ridge > 0:
            lam += self.ridge * (self.trace + d_in * lam) / d_in
        return lam

    def _merge(self, values: dict[str, float]) -> torch.Tensor:
        inverse = 1.0 / (self.eigvals + self.shift(values["rho"]))
        tau = self.tau_a + (self.evidence_q * inverse) @ self.eigvecs.T
        return self.base + tau * values["scale"]


_STATE_CLASSES: dict[str, type[FactorizedModule]] = {
    c.__name__: c for c in (FixedModule, ScaledModule, BmmModule)
}


def _build_bmm(
    ctx: TensorContext, p: bmm.Params, defaults: dict[str, float], kw: dict[str, Any]
) -> FactorizedModule:
    check_weights(ctx, "bmm")
    w_a = bmm.anchor_merge(ctx, p)
    if not is_matrix(ctx) or (p.gram != "data_free" and ctx.grams is None):
        return FixedModule(ctx.name, w_a, defaults, **kw)
    tau_a = w_a - ctx.base
    del w_a
    precision, evidence = bmm.posterior_terms(ctx, p, tau_a)
    trace = float(precision.diagonal().sum())
    if not trace > 0:  # no evidence: bmm.merge returns base + tau_a * scale
        return ScaledModule(ctx.name, ctx.base, tau_a, defaults, **kw)
    eigvals, eigvecs = torch.linalg.eigh((precision + precision.T) / 2)
    del precision
    evidence_q = evidence @ eigvecs
    del evidence
    return BmmModule(
        ctx.name, ctx.base, tau_a, evidence_q, eigvecs, eigvals, trace, p.ridge, defaults, **kw
    )


def _build_scaled(
    method: str, ctx: TensorContext, p: MethodParams, defaults: dict[str, float], kw: dict[str, Any]
) -> FactorizedModule:
    """delta = the method's own merge at scale 1 over a zero base (task vectors as experts)."""
    zero_base = dataclasses.replace(
        ctx,
        base=torch.zeros_like(ctx.base),
        experts=ctx.task_vectors(),
        extra=dict(ctx.extra),
        diagnostics={},
    )
    delta = METHODS[method].merge(zero_base, p.model_copy(update={"scale": 1.0}))
    return ScaledModule(ctx.name, ctx.base, delta, defaults, **kw)


def build_factorized(
    method_name: str,
    method_params: MethodParams | Mapping[str, Any],
    ctx: TensorContext,
    *,
    transposed: bool = False,
    dtype: torch.dtype | None = None,
) -> FactorizedModule:
    """The factorized form of one tensor's merge.

    `method_params`: the tensor's concrete params (the engine's per-tensor resolution, or a
    dict validated here); their tuned fields are the defaults of `merged`. `ctx`: the
    engine's context for the tensor (matrix_context / whole_context); its tensors are held,
    not copied. `transposed`: ctx holds a GPT-2 Conv1D weight transposed to nn.Linear
    layout, transposed back on output. `dtype`: the output dtype (default ctx's)."""
    if method_name not in TUNABLE_PARAMS:
        raise ValueError(
            f"method {method_name!r} cannot be tuned; tunable: {sorted(TUNABLE_PARAMS)}"
        )
    params_cls = METHODS[method_name].params
    p = (
        method_params
        if isinstance(method_params, params_cls)
        else params_cls.model_validate(
            method_params.model_dump() if isinstance(method_params, MethodParams) else method_params
        )
    )
    check_context(ctx)
    defaults = {k: float(getattr(p, k)) for k in TUNABLE_PARAMS[method_name]}
    kw: dict[str, Any] = {"transposed": transposed, "dtype": dtype or ctx.base.dtype}
    if method_name == "bmm":
        assert isinstance(p, bmm.Params)
        return _build_bmm(ctx, p, defaults, kw)
    return _build_scaled(method_name, ctx, p, defaults, kw)
