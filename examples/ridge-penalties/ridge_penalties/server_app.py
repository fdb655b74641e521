"""The user's ServerApp: rabo_flwr's Rabo strategy on their own task, with a server-side check of their own."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import scenario_from_run_config
from strategies import Rabo, sides_of

HERE = Path(__file__).resolve().parent  # the scenario's path in the run config is relative to this package

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = scenario_from_run_config(context.run_config, app_dir=HERE)
    task = cached_task(scenario)  # the RidgePenalties that scenario.yaml names
    optimum = task.optimal_penalties()

    def penalty_error(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's evaluate_fn: how far the learned penalties are from the known optimum."""
        x, _ = sides_of(arrays)
        return MetricRecord({"penalty_error": float((x["log_penalty"].exp() - optimum).abs().max())})

    strategy = Rabo(scenario, task)
    result = strategy.start(grid, strategy.initial_arrays(),
                            num_rounds=scenario.algorithm.iterations * strategy.rounds_per_iteration,
                            evaluate_fn=penalty_error)
    x, _ = sides_of(result.arrays)
    last = max(result.evaluate_metrics_serverapp)
    log(INFO, "learned penalties %s (optimum %s); validation R^2 %.4f, clients' validation loss %.4f",
        [round(v, 4) for v in x["log_penalty"].exp().tolist()], [round(v, 4) for v in optimum.tolist()],
        result.evaluate_metrics_serverapp[last]["val_r2"], result.evaluate_metrics_clientapp[last]["val_loss"])
