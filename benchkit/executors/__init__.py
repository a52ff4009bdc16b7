"""Executors turn the runner's tasks into results (benchkit.runner.execute where the models live);
they decide nothing: the runner commits, records failures and schedules checks."""
