"""The outer level of BMM (merge-math.md section 10.4), for any tunable method: Bayesian
optimisation over the unit cube of a SearchSpace.

- First `init_trials` points: a scrambled Sobol sequence (seeded), optionally led by a given
  point (the untuned default, so tuning never reports worse than not tuning).
- Then per step: a SingleTaskGP on the observed points (inputs already in [0, 1]^D,
  outcomes standardised), fitted by marginal likelihood, and qLogNoisyExpectedImprovement
  (X_baseline = the observed points) optimised over the cube for `batch` joint points.
- A failed GP fit falls back to the next Sobol points for that step (logged and recorded).
- Non-finite objectives (a diverged merge, NaN loss) count as the worst value seen, so the
  GP learns to avoid the region without the NaN poisoning the fit.

Everything is float64 on the CPU, and seeded per step: a run is reproducible for a seed.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from crucible.tune.space import GroupValues, SearchSpace

log = logging.getLogger(__name__)

DTYPE = torch.float64
# optimize_acqf effort: about a second per step on a CPU core at dim <= 20.
NUM_RESTARTS = 4
RAW_SAMPLES = 128
ACQF_MAXITER = 100
# The GP needs at least this many observations; before that, Sobol points.
MIN_GP_POINTS = 2


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the GP step, then the caller's setting back. The
    tensors are tiny (tens of points): with 2 threads a step measured 3-20 s here, with one
    0.1-0.8 s (dim 2-20), as OpenMP's per-op overhead dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BayesianOptimizer:
    """ask() proposes points of [0, 1]^dim, tell() records their objectives."""

    def __init__(
        self,
        dim: int,
        *,
        init_trials: int,
        batch: int = 1,
        seed: int = 0,
        maximize: bool = True,
        first_point: torch.Tensor | None = None,
    ) -> None:
        if dim < 1 or init_trials < 1 or batch < 1:
            raise ValueError("dim, init_trials and batch must be >= 1")
        self.dim = dim
        self.init_trials = init_trials
        self.batch = batch
        self.seed = seed
        self.maximize = maximize
        self._sobol = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
        self._first = None if first_point is None else self._check_points(first_point)
        if self._first is not None and self._first.shape[0] != 1:
            raise ValueError("first_point is one point of the cube")
        self._x = torch.empty((0, dim), dtype=DTYPE)
        self._y = torch.empty((0,), dtype=DTYPE)
        self._pending = torch.empty((0, dim), dtype=DTYPE)
        self._steps = 0
        # How the last ask() made its points: default, sobol, gp, or sobol_fallback.
        self.last_phase = ""
        self.fallbacks: list[str] = []

    @property
    def observed(self) -> int:
        return int(self._x.shape[0])

    def _check_points(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=DTYPE).reshape(-1, self.dim)
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError("points must lie in the unit cube [0, 1]^dim")
        return x

    def ask(self, n: int | None = None) -> torch.Tensor:
        """Up to `n` (default batch) new points, shape (q, dim). While the initial design is
        not used up, its next points and no more, so the GP starts after init_trials."""
        count = self.batch if n is None else n
        if count < 1:
            raise ValueError("ask for at least one point")
        asked = self.observed + int(self._pending.shape[0])
        if asked < self.init_trials:
            x = self._initial(asked, min(count, self.init_trials - asked))
        elif self.observed < MIN_GP_POINTS:
            self.last_phase = "sobol"
            x = self._sobol.draw(count, dtype=DTYPE)
        else:
            x = self._gp_step(count)
        x = x.clamp(0.0, 1.0)
        self._pending = torch.cat([self._pending, x])
        self._steps += 1
        return x.clone()

    def _initial(self, asked: int, count: int) -> torch.Tensor:
        if asked == 0 and self._first is not None:
            self.last_phase = "default"
            if count == 1:
                return self._first.clone()  # SobolEngine.draw(0) is an error
            return torch.cat([self._first, self._sobol.draw(count - 1, dtype=DTYPE)])
        self.last_phase = "sobol"
        return self._sobol.draw(count, dtype=DTYPE)

    def _fit_targets(self) -> torch.Tensor:
        """Observed objectives, as maximised by the GP, non-finite ones set to the worst."""
        y = self._y if self.maximize else -self._y
        finite = torch.isfinite(y)
        if not bool(finite.all()):
            worst = y[finite].min() if bool(finite.any()) else torch.tensor(0.0, dtype=DTYPE)
            y = torch.where(finite, y, worst)
        return y.unsqueeze(-1)

    def _gp_step(self, q: int) -> torch.Tensor:
        from botorch.acquisition.logei import qLogNoisyExpectedImprovement
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms.outcome import Standardize
        from botorch.optim import optimize_acqf
        from gpytorch.mlls import ExactMarginalLogLikelihood

        bounds = torch.stack(
            [torch.zeros(self.dim, dtype=DTYPE), torch.ones(self.dim, dtype=DTYPE)]
        )
        with _one_thread(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # botorch's numerical notes; failures raise
            torch.manual_seed(self.seed * 1_000_003 + self._steps)
            try:
                model = SingleTaskGP(
                    self._x, self._fit_targets(), outcome_transform=Standardize(m=1)
                )
                fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
                acqf = qLogNoisyExpectedImprovement(
                    model,
                    X_baseline=self._x,
                    X_pending=self._pending if self._pending.shape[0] else None,
                )
                x, _ = optimize_acqf(
                    acqf,
                    bounds=bounds,
                    q=q,
                    num_restarts=NUM_RESTARTS,
                    raw_samples=RAW_SAMPLES,
                    options={"maxiter": ACQF_MAXITER},
                )
            except Exception as exc:  # a GP that cannot be fitted must not end the job
                note = f"step {self._steps}: GP step failed ({type(exc).__name__}: {exc}); Sobol"
                log.warning("tuning %s", note)
                self.fallbacks.append(note)
                self.last_phase = "sobol_fallback"
                return self._sobol.draw(q, dtype=DTYPE)
        self.last_phase = "gp"
        return x.detach().to(DTYPE).reshape(q, self.dim)

    def tell(self, x: torch.Tensor, y: Sequence[float] | torch.Tensor) -> None:
        """Record objectives `y` (n,) of points `x` (n, dim); NaN or infinite values are
        kept as given (best() skips them) and fitted as the worst seen."""
        x = self._check_points(x)
        y_t = torch.as_tensor(y, dtype=DTYPE).reshape(-1)
        if y_t.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} points but {y_t.shape[0]} objectives")
        self._x = torch.cat([self._x, x])
        self._y = torch.cat([self._y, y_t])
        for row in x:
            hits = (self._pending == row).all(dim=1).nonzero()
            if hits.numel():
                i = int(hits[0])
                self._pending = torch.cat([self._pending[:i], self._pending[i + 1 :]])

    def best(self) -> tuple[torch.Tensor, float]:
        """The best point with a finite objective and that objective (the earliest on ties)."""
        finite = torch.isfinite(self._y)
        if not bool(finite.any()):
            raise ValueError("no finite objective has been observed")
        y = self._y if self.maximize else -self._y
        y = torch.where(finite, y, torch.tensor(-math.inf, dtype=DTYPE))
        i = int(torch.argmax(y))  # the first maximum
        return self._x[i].clone(), float(self._y[i])


@dataclass
class TrialRecord:
    index: int
    batch: int  # which ask() proposed it; one batch is evaluated by one objective call
    phase: str  # default | sobol | gp | sobol_fallback
    params: GroupValues  # values per group
    x: list[float]  # the point in the unit cube
    objective: float | None  # None when the objective was NaN or infinite
    seconds: float  # the batch's objective time divided among its trials
    propose_seconds: float  # the optimizer's time for the batch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuningResult:
    trials: list[TrialRecord]
    best: TrialRecord | None  # None when no trial had a finite objective
    maximize: bool
    seconds: float
    fallbacks: list[str] = field(default_factory=list)


def run_tuning(
    space: SearchSpace,
    objective: Callable[[list[GroupValues]], Sequence[float]],
    *,
    trials: int,
    init_trials: int,
    batch: int = 1,
    seed: int = 0,
    maximize: bool = True,
    start_at_default: bool = True,
    on_trial: Callable[[TrialRecord], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> TuningResult:
    """Ask, evaluate, tell until `trials` trials ran (the last batch truncated).

    `objective` gets a batch of values per group and returns one objective per entry
    (higher is better unless maximize is False). `start_at_default`: trial 0 is the space's
    default point. `check_cancelled` is called before each batch (it raises to stop)."""
    if trials < 1 or not 1 <= init_trials <= trials or batch < 1:
        raise ValueError("need trials >= 1, 1 <= init_trials <= trials and batch >= 1")
    opt = BayesianOptimizer(
        space.dim,
        init_trials=init_trials,
        batch=batch,
        seed=seed,
        maximize=maximize,
        first_point=space.default_point() if start_at_default else None,
    )
    started = time.perf_counter()
    records: list[TrialRecord] = []
    batch_index = 0
    while len(records) < trials:
        if check_cancelled is not None:
            check_cancelled()
        t0 = time.perf_counter()
        x = opt.ask(min(batch, trials - len(records)))
        phase = opt.last_phase
        t1 = time.perf_counter()
        values = [space.decode(row) for row in x]
        ys = [float(v) for v in objective(values)]
        t2 = time.perf_counter()
        if len(ys) != len(values):
            raise ValueError(f"the objective returned {len(ys)} values for {len(values)} trials")
        opt.tell(x, ys)
        for row, vals, y in zip(x, values, ys, strict=True):
            record = TrialRecord(
                index=len(records),
                batch=batch_index,
                phase=phase if not (phase == "default" and records) else "sobol",
                params=vals,
                x=[float(v) for v in row],
                objective=y if math.isfinite(y) else None,
                seconds=(t2 - t1) / len(ys),
                propose_seconds=t1 - t0,
            )
            records.append(record)
            if on_trial is not None:
                on_trial(record)
        batch_index += 1
    finite = [r for r in records if r.objective is not None]
    best = None
    if finite:
        sign = 1.0 if maximize else -1.0
        best = max(finite, key=lambda r: (sign * r.objective, -r.index))  # type: ignore[operator]
    return TuningResult(
        trials=records,
        best=best,
        maximize=maximize,
        seconds=time.perf_counter() - started,
        fallbacks=list(opt.fallbacks),
    )
