"""Harnesses around the TRPrompt loop: the comparison with baselines and hyperparameter sweeps.

* :mod:`trprompt.experiments.compare`: methods side by side (config, runner, report);
* :mod:`trprompt.experiments.sweep`: sweeps (spec, trials, results); Ray Tune glue is in ``cluster/``.
"""
