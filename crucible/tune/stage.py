"""The tune stage: Bayesian optimisation of per-module-group hyperparameters against a
validation split, each trial a merge in memory (merge-math.md section 10.4).

1. Build the evaluator once from the base config (weights swapped in place afterwards).
2. Read every mergeable tensor once and build its factorization (crucible/tune/factorized:
   for bmm an eigendecomposition of the summed Gram per module; for task_arithmetic and
   ties the combined task vector), so a trial costs matrix products, never a factorization.
   Tensors the tuned params do not touch (bmm's non-matrix tensors: the anchor's output)
   are merged once and swapped in once.
3. Trial 0 is the method's own (requested) values; then Sobol points, then a GP with
   qLogNoisyExpectedImprovement (crucible/tune/optimizer). Every trial is reported (params,
   objective, metric per task, seconds split into merge, swap and evaluation, the worker
   that ran it). A trial is crucible/tune/trial.run_trial; with `trials` (a worker with a
   Redis broker, tuning.batch >= trial_fanout_min_batch) a batch's trials also run on
   other workers (crucible/tune/trials).
4. The best trial's values become exact-name override rules in the method's params: the
   merge stage then writes that model with the ordinary engine, and `score_published`
   scores what was written on the held-out test split.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any

import torch

from crucible.engine import (
    FLOAT_CODES,
    OUTPUT_CODES,
    MergeInputs,
    ParamsFor,
    check_finite,
    matrix_context,
    whole_context,
)
from crucible.errors import CrucibleError
from crucible.methods.base import is_matrix
from crucible.methods.registry import get_method
from crucible.settings import Settings
from crucible.sources.layout import transposed_weights
from crucible.sources.resolve import open_artifact_folder
from crucible.sources.tensor_reader import TensorReader
from crucible.spec import TUNABLE_PARAMS, MergeSpec
from crucible.tune.factorized import FactorizedModule, build_factorized
from crucible.tune.optimizer import TrialRecord, run_tuning
from crucible.tune.space import GroupValues, SearchSpace, module_groups, override_rules
from crucible.tune.trial import TrialResult, run_trial
from crucible.tune.trials import not_split_reason

if TYPE_CHECKING:
    from crucible.datasets.storage import DatasetHandle
    from crucible.evaluate.base import EvalResult, Evaluator
    from crucible.pipeline import Reporter
    from crucible.tune.trials import TrialFanout

# Tuning holds every module's factorization in host memory; past this it refuses clearly.
TUNE_MEMORY_FRACTION = 0.5


@dataclass
class TuningOutcome:
    spec: MergeSpec  # the request with the best trial's values as override rules
    summary: dict[str, Any]
    evaluator: Evaluator
    trial_seconds: list[dict[str, float]] = field(default_factory=list)

    def score_published(self, staging: Path, reporter: Reporter) -> dict[str, Any]:
        """Swap the weights the merge stage wrote into the evaluator and score them on the
        test split (and validation again, to show the published model is the best trial)."""
        reporter.progress(0, 2, "splits")
        self.evaluator.swapper.load_from(open_artifact_folder(staging))
        validation = self.evaluator.evaluate("validation")
        reporter.progress(1, 2, "splits")
        reporter.check_cancelled()  # between the two evaluations, as between trials
        summary = dict(self.summary)
        summary["published_validation"] = _result(validation)
        if self.evaluator.examples("test"):
            test = self.evaluator.evaluate("test")
            summary["test"] = _result(test)
            expert_scores = getattr(self.evaluator, "expert_scores", None)
            if expert_scores is not None:
                own: dict[str, float] = expert_scores("test")
                summary["experts_test"] = {"per_task": own, "value": fmean(own.values())}
                if test.metric == "accuracy":
                    # Normalised accuracy (merged / the expert's own), the merging papers' score.
                    ratios = [test.per_task[t] / a for t, a in own.items() if a > 0]
                    summary["normalized_test"] = fmean(ratios) if ratios else None
        reporter.progress(2, 2, "splits")
        return summary


def _result(r: EvalResult) -> dict[str, Any]:
    return {
        "value": r.value,
        "objective": r.objective,
        "per_task": r.per_task,
        "examples": r.examples,
        "seconds": round(r.seconds, 4),
    }


def _module_of(name: str) -> str:
    """Tensors of one module (weight and bias) share the module's hyperparameters."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def tune_merge(
    spec: MergeSpec,
    inputs: MergeInputs,
    datasets: Mapping[str, DatasetHandle],
    settings: Settings,
    reporter: Reporter,
    device: torch.device,
    trials: TrialFanout | None = None,
) -> TuningOutcome:
    """`trials`: the worker's way to run a batch's trials on other workers too
    (crucible.tune.trials); None runs them here."""
    tuning = spec.tuning
    assert tuning is not None
    if tuning.trials > settings.max_trials:
        raise CrucibleError(
            "limit_exceeded",
            f"tuning.trials is {tuning.trials}; this server allows at most {settings.max_trials}",
            {"limit": "max_trials", "value": settings.max_trials},
        )
    method = get_method(spec.method.name)
    tuned_params = TUNABLE_PARAMS[method.name]
    started = time.perf_counter()
    evaluator = tuning_evaluator(spec, inputs, datasets, device)
    reporter.event(
        "tuning",
        f"evaluator ready: {evaluator.metric} on {evaluator.examples('validation')} validation "
        f"and {evaluator.examples('test')} test examples",
    )
    modules, fixed = _factorize(spec, inputs, reporter, device)
    if not modules:
        raise CrucibleError(
            "nothing_to_tune",
            f"no tensor of this model is affected by {method.name}'s {list(tuned_params)}",
            None,
        )
    by_module = module_groups(sorted({_module_of(m.name) for m in modules}), tuning.groups)
    group_of = {
        m.name: g
        for g, members in by_module.items()
        for m in modules
        if _module_of(m.name) in members
    }
    request = spec.method.params.model_dump()
    defaults = {p: request[p] for p in tuned_params if isinstance(request.get(p), int | float)}
    space = SearchSpace(method.name, list(by_module), defaults)
    factorize_seconds = time.perf_counter() - started
    reporter.event(
        "tuning",
        f"{len(modules)} tensors in {len(by_module)} groups ({tuning.groups}), "
        f"{space.dim} dimensions; factorized in {factorize_seconds:.1f} s",
        {"groups": {g: len(v) for g, v in by_module.items()}},
    )

    seconds: list[dict[str, float]] = []
    details: list[dict[str, Any]] = []

    fanout = trials if trials is not None and trials.enabled(tuning.batch) else None
    if fanout is not None:
        try:
            fanout.open(modules, fixed, group_of)
        except Exception as exc:
            # The fan-out only saves time: a folder that cannot take the factorizations (a
            # full disk: bmm's are larger than the model), or Redis unreachable, leaves the
            # trials to this worker rather than failing a job one worker can run.
            fanout.close()
            fanout = None
            reporter.event(
                "trials_not_split",
                f"the trials run here only: {not_split_reason(exc)}",
                {"error": type(exc).__name__},
            )
        except BaseException:
            fanout.close()
            raise
    if fanout is not None:
        reporter.event(
            "trials_split",
            f"each batch of {tuning.batch} trials runs on any free worker, this one helping",
            {"batch": tuning.batch},
        )
    evaluator.swapper.swap(fixed)
    del fixed

    def run_local(values: GroupValues) -> TrialResult:
        reporter.check_cancelled()
        return run_trial(modules, group_of, evaluator, values)

    def objective(batch: list[GroupValues]) -> list[float]:
        if fanout is None:
            results = [run_local(values) for values in batch]
        else:
            first = len(details)
            results = fanout.run_batch(
                first,
                batch,
                lambda index: run_local(batch[index - first]),
                reporter.check_cancelled,
                reporter.event,
            )
        for result in results:
            seconds.append(result.seconds)
            details.append(
                {
                    "metric": result.metric,
                    "value": result.value,
                    "per_task": result.per_task,
                    "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
                    "worker": result.worker,
                }
            )
        return [result.objective for result in results]

    def on_trial(record: TrialRecord) -> None:
        index = record.index
        data = {
            "index": index,
            "phase": record.phase,
            "params": record.params,
            "objective": record.objective,
            **details[index],
            "propose_seconds": round(record.propose_seconds, 4),
        }
        reporter.trial(index, data)
        reporter.progress(index + 1, tuning.trials, "trials")

    reporter.progress(0, tuning.trials, "trials")
    try:
        result = run_tuning(
            space,
            objective,
            trials=tuning.trials,
            init_trials=tuning.init_trials,
            batch=tuning.batch,
            seed=tuning.split.seed,
            maximize=True,  # objectives are "higher is better": accuracy, or -loss
            start_at_default=True,
            on_trial=on_trial,
            check_cancelled=reporter.check_cancelled,
        )
    finally:
        if fanout is not None:
            fanout.close()
    if result.best is None:
        raise CrucibleError(
            "tuning_failed",
            f"every one of the {len(details)} trials gave a NaN or infinite {evaluator.metric}",
            {"trials": len(details)},
        )
    best_index = result.best.index
    best_values: GroupValues = result.best.params
    by_tensor = {g: [m.name for m in modules if group_of[m.name] == g] for g in by_module}
    rules = override_rules(best_values, by_tensor, fallback=space.defaults)
    raw = spec.model_dump(mode="json")
    raw["method"]["params"].update(rules)
    tuned_spec = MergeSpec.model_validate(raw)
    summary = {
        "metric": evaluator.metric,
        "trials": len(details),
        "groups": tuning.groups,
        "group_count": len(by_module),
        "dimensions": space.dim,
        "best_trial": best_index,
        "best_params": best_values,
        "validation": {
            "value": details[best_index]["value"],
            "per_task": details[best_index]["per_task"],
        },
        "default_validation": {"value": details[0]["value"], "per_task": details[0]["per_task"]},
        "seconds": {
            "factorize": round(factorize_seconds, 3),
            "trials": round(sum(s["total"] for s in seconds), 3),
            "per_trial_mean": {
                k: round(sum(s[k] for s in seconds) / len(seconds), 4)
                for k in ("merge", "swap", "evaluate", "total")
            },
        },
    }
    share = summary["seconds"]["per_trial_mean"]
    summary["merge_and_swap_share"] = round(
        (share["merge"] + share["swap"]) / max(share["total"], 1e-12), 4
    )
    reporter.event(
        "tuned",
        f"best trial {best_index}: {evaluator.metric} {details[best_index]['value']:.4f} on "
        f"validation (method defaults: {details[0]['value']:.4f})",
        {"best_params": best_values},
    )
    return TuningOutcome(tuned_spec, summary, evaluator, seconds)


def tuning_evaluator(
    spec: MergeSpec,
    inputs: MergeInputs,
    datasets: Mapping[str, DatasetHandle],
    device: torch.device,
) -> Evaluator:
    """The job's evaluator (the job's worker and a trial task build it alike)."""
    from crucible.evaluate import build_evaluator

    assert spec.tuning is not None
    names = [e.name or f"expert{i}" for i, e in enumerate(spec.experts)]
    return build_evaluator(spec.tuning, inputs.base, inputs.experts, names, datasets, device)


def _factorize(
    spec: MergeSpec,
    inputs: MergeInputs,
    reporter: Reporter,
    device: torch.device,
) -> tuple[list[FactorizedModule], dict[str, torch.Tensor]]:
    """(the tuned tensors' factorizations, the merged values of every other merged tensor)."""
    method = get_method(spec.method.name)
    base = inputs.base
    names = [
        n
        for n in base.tensors
        if base.tensors[n].dtype in FLOAT_CODES and n not in inputs.mismatched
    ]
    params_for = ParamsFor(spec, method, list(base.tensors))
    transposed = transposed_weights(base.root, names) if method.matrix else frozenset()
    out_code = OUTPUT_CODES.get(spec.output.dtype or "", None)
    weights = [e.weight for e in spec.experts]
    budget = int(TUNE_MEMORY_FRACTION * _host_memory())
    held = 0
    modules: list[FactorizedModule] = []
    fixed: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        base_reader = stack.enter_context(TensorReader(base))
        readers = [stack.enter_context(TensorReader(e)) for e in inputs.experts]
        gram_readers = (
            [stack.enter_context(TensorReader(g)) for g in inputs.grams] if inputs.grams else None
        )
        reporter.progress(0, len(names), "tensors")
        for i, name in enumerate(names):
            reporter.check_cancelled()
            out_dtype = FLOAT_CODES[out_code or base.tensors[name].dtype]
            flip = name in transposed
            if method.matrix:
                ctx = matrix_context(
                    name, base_reader, readers, gram_readers, weights, flip, device
                )
            else:
                ctx = whole_context(name, base_reader, readers, weights, device)
            params = params_for(name)
            if method.name == "bmm" and not _bmm_tunes(ctx, params):
                merged = method.merge(ctx, params)
                check_finite(name, merged)
                fixed[name] = (merged.T if flip else merged).to(device="cpu", dtype=out_dtype)
            else:
                module = build_factorized(
                    method.name, params, ctx, transposed=flip, dtype=out_dtype
                )
                held += module.nbytes
                if held > budget:
                    raise CrucibleError(
                        "limit_exceeded",
                        f"tuning this model would hold more than {budget / 2**30:.1f} GiB of "
                        "per-module factorizations in memory; tune a smaller model or use "
                        "groups on a GPU worker with more memory",
                        {"limit": "tune_memory", "bytes": held},
                    )
                modules.append(module)
            del ctx
            reporter.progress(i + 1, len(names), "tensors")
    return modules, fixed


def _bmm_tunes(ctx: Any, params: Any) -> bool:
    """rho and scale act on the matrix tensors bmm solves for (with a Gram when the Grams are
    from activations); other tensors take the anchor's output whatever they are."""
    if not is_matrix(ctx):
        return False
    return params.gram == "data_free" or ctx.grams is not None


def _host_memory() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 2**30
