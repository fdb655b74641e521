"""ServerApp: resolve the scenario, run it with its family's Flower strategy."""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from strategies import strategy_for

from .scenario import scenario_from_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = scenario_from_run_config(context.run_config)  # fails here, before any work, on bad input
    # The server's own work (aggregation, evaluation) is light; one thread keeps it from fighting
    # co-located simulated clients for cores (measured: the final evaluation 8x slower otherwise).
    torch.set_num_threads(1)
    strategy = strategy_for(scenario)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=scenario.algorithm.iterations * strategy.rounds_per_iteration)
