"""ServerApp: resolve the scenario, run it with its family's Flower strategy."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from strategies import strategy_for

from .scenario import scenario_from_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = scenario_from_run_config(context.run_config)  # fails here, before any work, on bad input
    strategy = strategy_for(scenario)  # the server's own work runs on SERVER_THREADS (TrainingLoop.run)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=scenario.algorithm.iterations * strategy.rounds_per_iteration)
