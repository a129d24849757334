"""Run FusionBench 0.2.33's own merge functions (in their own venv) on given tensors.

FusionBench pins its own dependency set, so, like mergekit (mergekit_runner.py), it lives in
a separate virtual environment, $CRUCIBLE_FUSIONBENCH_VENV (default <repo>/.venv-fusionbench,
built by `make test-deps`), and is driven as a subprocess. Tensors go to the driver in a
safetensors file in a work directory and come back the same way; nothing is pickled.

One subprocess runs any number of jobs (importing fusion_bench takes several seconds), each a
call of one FusionBench function, exactly as FusionBench calls it from its algorithm classes
but on the tensors given here, on the CPU, in the dtype given (FusionBench keeps the input
dtype; TSV-M only upcasts half precision):

- `tsvm_job(task_vectors, exclude_keys)`:
  `fusion_bench.method.task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction`
  -> the merged task vector (TSVM.py applies a scalar alpha afterwards; a per-task alpha
  list scales the task vectors before: do that to the inputs).
- `iso_c_job(task_vectors, exclude_keys)`: `fusion_bench.method.isotropic_merging.iso_utils
  .iso_c` -> the merged task vector (IsotropicMerging multiplies by scaling_factor after).
- `iso_cts_job(task_vectors, common_space_fraction, exclude_keys)`: `iso_utils.iso_cts`.
- `wudi_job(task_vectors, iter_num, exclude_keys)`: `fusion_bench.method.wudi.wudi
  .wudi_merging` (Adam, lr 1e-5 fixed inside it) -> the merged task vector.
- `regmean_job(params, grams, reduce_non_diagonal_ratio, weight_transpose)`:
  `fusion_bench.method.regmean.regmean.merging_with_regmean_weights`, the function
  RegMeanAlgorithm calls once the Grams are collected. `params` maps a parameter name to
  the per-model tensors (the experts' WEIGHTS W_t, not task vectors; FusionBench RegMean
  merges weights); `grams` is one dict per model from MODULE name (a `.weight` parameter
  name without the suffix) to that model's Gram over the module's inputs (FusionBench's
  "regmean weights", the mean of X^T X over tokens). A `<module>.weight` whose module has
  a Gram is merged as (sum_t G_t)^{-1} sum_t G_t W_t^T (transposed back when
  weight_transpose, FusionBench's default, true for nn.Linear layout); every other
  parameter is the plain mean. FusionBench inverts the Gram sum explicitly
  (torch.inverse), and builds the off-diagonal reduction mask in float32 even for float64
  Grams, so a reduce_non_diagonal_ratio other than 1 carries float32 rounding.

Task vectors are dicts name -> tensor, one per expert, with the same names; outputs are
dicts name -> tensor. `run_fusionbench({"key": job, ...}, workdir)` runs several jobs in one
process and returns {"key": output}; `run_fusionbench_one(job, workdir)` runs one.

A missing or wrong venv raises FusionbenchUnavailable with the install command.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.side_venv import checked_python, reference_env, require

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
FUSIONBENCH_VERSION = "0.2.33"
INSTALL_HINT = (
    "FusionBench is not installed where the parity tests look for it. From the repository "
    "root run:\n"
    "  make .venv-fusionbench/.installed\n"
    "or by hand:\n"
    "  python3.11 -m venv .venv-fusionbench && "
    ".venv-fusionbench/bin/pip install torch==2.13.0 fusion-bench==0.2.33\n"
    "or point CRUCIBLE_FUSIONBENCH_VENV at an existing venv with fusion-bench 0.2.33."
)


class FusionbenchUnavailable(RuntimeError):
    """The FusionBench venv is missing or broken; the message says how to install it."""


class FusionbenchFailed(RuntimeError):
    """The driver ran and failed; the message carries its stderr."""


def fusionbench_venv() -> Path:
    return Path(os.environ.get("CRUCIBLE_FUSIONBENCH_VENV", REPO / ".venv-fusionbench"))


def fusionbench_python() -> Path:
    """The venv's python, checked to have fusion-bench 0.2.33 (importable)."""
    return checked_python(
        fusionbench_venv(),
        "fusion-bench",
        FUSIONBENCH_VERSION,
        INSTALL_HINT,
        FusionbenchUnavailable,
        module="fusion_bench",
    )


def require_fusionbench() -> None:
    """Fail (never skip) the calling test when the FusionBench venv is missing."""
    require(fusionbench_python, FusionbenchUnavailable)


# --- jobs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One call of a FusionBench function; build it with the *_job helpers below."""

    function: str  # a key of the driver's FUNCTIONS table
    task_vectors: Sequence[Mapping[str, torch.Tensor]] = ()
    params: Mapping[str, Sequence[torch.Tensor]] = field(default_factory=dict)
    grams: Sequence[Mapping[str, torch.Tensor]] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


def tsvm_job(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], exclude_keys: Sequence[str] = ()
) -> Job:
    return Job("tsvm", task_vectors=task_vectors, options={"exclude_keys": list(exclude_keys)})


def iso_c_job(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], exclude_keys: Sequence[str] = ()
) -> Job:
    return Job("iso_c", task_vectors=task_vectors, options={"exclude_keys": list(exclude_keys)})


def iso_cts_job(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    common_space_fraction: float,
    exclude_keys: Sequence[str] = (),
) -> Job:
    return Job(
        "iso_cts",
        task_vectors=task_vectors,
        options={
            "common_space_fraction": common_space_fraction,
            "exclude_keys": list(exclude_keys),
        },
    )


def wudi_job(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    iter_num: int,
    exclude_keys: Sequence[str] = (),
) -> Job:
    return Job(
        "wudi",
        task_vectors=task_vectors,
        options={"iter_num": iter_num, "exclude_keys": list(exclude_keys)},
    )


def regmean_job(
    params: Mapping[str, Sequence[torch.Tensor]],
    grams: Sequence[Mapping[str, torch.Tensor]],
    *,
    reduce_non_diagonal_ratio: float = 1.0,
    weight_transpose: bool = True,
) -> Job:
    return Job(
        "regmean",
        params=params,
        grams=grams,
        options={
            "reduce_non_diagonal_ratio": reduce_non_diagonal_ratio,
            "weight_transpose": weight_transpose,
        },
    )


# --- the driver (runs in the FusionBench venv) ------------------------------------------------

_DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
        compute_and_sum_svd_mem_reduction,
    )
    from fusion_bench.method.wudi.wudi import wudi_merging

    def tsvm(job, o):
        return compute_and_sum_svd_mem_reduction(
            job["task_vectors"], exclude_keys=o["exclude_keys"], accelerator="cpu"
        )

    def run_iso_c(job, o):
        return iso_c(job["task_vectors"], accelerator="cpu", exclude_keys=o["exclude_keys"])

    def run_iso_cts(job, o):
        return iso_cts(
            job["task_vectors"],
            common_space_fraction=o["common_space_fraction"],
            accelerator="cpu",
            exclude_keys=o["exclude_keys"],
        )

    def wudi(job, o):
        return wudi_merging(
            job["task_vectors"],
            accelerator="cpu",
            iter_num=o["iter_num"],
            exclude_keys=o["exclude_keys"],
        )

    def regmean(job, o):
        return merging_with_regmean_weights(
            job["params"],
            job["grams"],
            reduce_non_diagonal_ratio=o["reduce_non_diagonal_ratio"],
            weight_transpose=o["weight_transpose"],
        )

    FUNCTIONS = {
        "tsvm": tsvm, "iso_c": run_iso_c, "iso_cts": run_iso_cts, "wudi": wudi,
        "regmean": regmean,
    }

    spec = json.loads(open(sys.argv[1]).read())
    tensors = load_file(spec["inputs"])
    out, names = {}, {}
    for key, job in spec["jobs"].items():
        call = {
            "task_vectors": [
                {name: tensors[k] for name, k in tv.items()} for tv in job["task_vectors"]
            ],
            "params": {name: [tensors[k] for k in ks] for name, ks in job["params"].items()},
            "grams": [{name: tensors[k] for name, k in g.items()} for g in job["grams"]],
        }
        result = FUNCTIONS[job["function"]](call, job["options"])
        names[key] = {}
        for i, (name, value) in enumerate(result.items()):
            slot = f"{key}/{i}"
            out[slot] = value.detach().to("cpu").clone().contiguous()
            names[key][name] = slot
    save_file(out, spec["output"])
    with open(spec["names"], "w") as f:
        json.dump(names, f)
    """
)


def run_fusionbench(
    jobs: Mapping[str, Job], workdir: Path, *, timeout: float = 600
) -> dict[str, dict[str, torch.Tensor]]:
    """Run every job in one FusionBench process; {job key: {tensor name: output}}."""
    from safetensors.torch import load_file, save_file

    python = fusionbench_python()
    workdir.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    slots: dict[int, str] = {}  # id(tensor) -> slot: a tensor given to several jobs goes once
    keep: list[torch.Tensor] = []  # holds the originals so that their ids stay unique

    def put(tensor: torch.Tensor) -> str:
        if id(tensor) not in slots:
            slots[id(tensor)] = str(len(flat))
            keep.append(tensor)
            # A copy: views of one storage cannot go into a safetensors file side by side.
            flat[slots[id(tensor)]] = tensor.detach().to("cpu").clone().contiguous()
        return slots[id(tensor)]

    spec_jobs: dict[str, Any] = {}
    for key, job in jobs.items():
        spec_jobs[key] = {
            "function": job.function,
            "options": dict(job.options),
            "task_vectors": [
                {name: put(tensor) for name, tensor in tv.items()} for tv in job.task_vectors
            ],
            "params": {name: [put(t) for t in ts] for name, ts in job.params.items()},
            "grams": [{name: put(tensor) for name, tensor in g.items()} for g in job.grams],
        }
    spec = {
        "inputs": str(workdir / "inputs.safetensors"),
        "output": str(workdir / "output.safetensors"),
        "names": str(workdir / "output_names.json"),
        "jobs": spec_jobs,
    }
    save_file(flat, spec["inputs"])
    (workdir / "spec.json").write_text(json.dumps(spec))
    (workdir / "fusionbench_driver.py").write_text(_DRIVER)
    done = subprocess.run(
        [str(python), str(workdir / "fusionbench_driver.py"), str(workdir / "spec.json")],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=reference_env(),
        cwd=workdir,
    )
    if done.returncode != 0:
        raise FusionbenchFailed(f"FusionBench driver exited {done.returncode}:\n{done.stderr}")
    outputs = load_file(spec["output"])
    names = json.loads(Path(spec["names"]).read_text())
    return {key: {name: outputs[slot] for name, slot in job.items()} for key, job in names.items()}


def run_fusionbench_one(
    job: Job, workdir: Path, *, timeout: float = 600
) -> dict[str, torch.Tensor]:
    """One job in its own FusionBench process."""
    return run_fusionbench({"job": job}, workdir, timeout=timeout)["job"]
