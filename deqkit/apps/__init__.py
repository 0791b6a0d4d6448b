"""Applications built on the deqkit library: the jobs behind the ``deqkit`` commands and the
benchmark suite.

- :mod:`deqkit.apps.compare`: one DEQ per gradient estimator, side by side (``deqkit compare``);
- :mod:`deqkit.apps.sim`: state-driven implicit models end to end (``deqkit sim``);
- :mod:`deqkit.apps.hpo`: bi-level hyperparameter search (``deqkit hpo``);
- :mod:`deqkit.apps.bench`: the benchmark suite (``deqkit bench``);
- :mod:`deqkit.apps.common`: what the DEQ-classifier jobs share.

The library core (solvers, linear, estimators, deq, models, data, train, diagnostics, sim,
bilevel) never imports from here or from :mod:`deqkit.cli`; ``tests/test_layering.py`` checks it.
"""
