"""Bayesian optimisation of per-module-group hyperparameters (merge-math.md section 10.4).

- space.py: module groups, the search space (unit cube <-> param values), override rules
  that reproduce a trial's values through the engine's per-tensor params;
- factorized.py: per-module precomputation, so a trial re-merges with matrix products only;
- optimizer.py: Sobol start, then a GP with qLogNoisyExpectedImprovement; the trial loop.

space.py is torch-free (the API may use its grouping and rules); factorized.py and
optimizer.py import torch (and botorch) and are worker-only.
"""
