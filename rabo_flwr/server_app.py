"""ServerApp: resolve the scenario, build the strategy, run the global iterations, write results."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from strategies import RaboStrategy

from .masks import make_policy
from .results import ResultsWriter
from .runtime import cached_task, choose_device
from .scenario import scenario_from_run_config

app = ServerApp()
log = logging.getLogger("rabo_flwr")


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = scenario_from_run_config(context.run_config)  # fails here, before any work, on bad input
    task = cached_task(scenario)
    device = choose_device(scenario)
    algo, clients = scenario.algorithm, scenario.clients
    writer = ResultsWriter(scenario.results_path, scenario)
    x, y = task.init_tensors(scenario.seed)
    policies = {
        "x": make_policy(algo.mask_x, scenario.seed, algo.rolling_step),
        "y": make_policy(algo.mask_y, scenario.seed, algo.rolling_step),
    }
    strategy = RaboStrategy(
        task.layouts, policies, alpha=algo.alpha, beta=algo.beta, fraction=clients.fraction,
        min_available=clients.min_available or clients.num, capacity_of=scenario.capacity,
        seed=scenario.seed, log_record=writer.log,
    )
    initial = ArrayRecord({f"x.{k}": v for k, v in x.items()} | {f"y.{k}": v for k, v in y.items()})
    started = time.perf_counter()
    strategy.start(
        grid, initial, num_rounds=algo.iterations,
        evaluate_fn=lambda q, gx, gy: task.evaluate(gx, gy, device), eval_every=scenario.run.eval_every,
    )
    writer.save_model(strategy.server.x, strategy.server.y)
    writer.log({"phase": "done", "iteration": algo.iterations, "wall_time": time.perf_counter() - started})
    log.info("results in %s", writer.directory.resolve())
