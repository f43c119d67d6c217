"""``lightning-tvlars compare``: the accuracy benchmark's protocol on any LightningModule.

* :mod:`~lightning_tvlars.compare.options`: the command line (LightningCLI's ``--model``,
  ``--data``, ``--trainer`` and YAML, and the protocol's options), checked in one line each;
* :mod:`~lightning_tvlars.compare.target`: the user's model, data and Trainer, built fresh for
  every run;
* :mod:`~lightning_tvlars.compare.run`: one run through a Lightning Trainer with the arm's
  recipe in place of ``configure_optimizers``;
* :mod:`~lightning_tvlars.compare.check`: the checks before anything runs, and the timed probe;
* :mod:`~lightning_tvlars.compare.report`: the page, from the CSV rows alone;
* :mod:`~lightning_tvlars.compare.cli`: the command.

The tuning rules, the planner and the statistics are the benchmark's
(:mod:`lightning_tvlars.bench.protocol`, :mod:`~lightning_tvlars.bench.runner`,
:mod:`~lightning_tvlars.bench.report`).
"""
