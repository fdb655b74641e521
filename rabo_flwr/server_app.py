"""ServerApp: resolve the scenario, build the strategy, run the global iterations, write results."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from strategies import RaboStrategy

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .masks import make_policy
from .results import ResultsWriter
from .runtime import cached_task, choose_device
from .scenario import scenario_from_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = scenario_from_run_config(context.run_config)  # fails here, before any work, on bad input
    # The server's own work (aggregation, evaluation) is light; one thread keeps it from fighting
    # co-located simulated clients for cores (measured: the final evaluation 8x slower otherwise).
    torch.set_num_threads(1)
    run, algo, clients = scenario.run, scenario.algorithm, scenario.clients
    resumed = load_checkpoint(scenario.results_path) if run.resume else None
    task = cached_task(scenario)
    task.prepare()  # missing or corrupt data stops the run here, before any results are written
    device = choose_device(scenario)
    writer = ResultsWriter(scenario.results_path, scenario, history=resumed.metrics if resumed else None)
    x, y = (resumed.x, resumed.y) if resumed else task.init_tensors(scenario.seed)
    policies = {side: make_policy(getattr(algo, f"mask_{side}"), scenario.seed, algo.rolling_step) for side in ("x", "y")}
    strategy = RaboStrategy(
        task.layouts, policies, alpha=algo.alpha, beta=algo.beta, fraction=clients.fraction,
        min_available=clients.min_available or clients.num, capacity_of=scenario.capacity,
        seed=scenario.seed, log_record=writer.log, phase_timeout=run.phase_timeout,
    )

    def checkpoint(iteration, server):
        if run.checkpoint_every and (iteration % run.checkpoint_every == 0 or iteration == algo.iterations):
            save_checkpoint(writer.directory, Checkpoint(iteration, server.x, server.y, writer.records, scenario.to_dict()))

    initial = ArrayRecord({f"x.{k}": v for k, v in x.items()} | {f"y.{k}": v for k, v in y.items()})
    started = time.perf_counter()
    strategy.start(
        grid, initial, num_rounds=algo.iterations, timeout=run.node_wait_timeout,
        evaluate_fn=lambda q, gx, gy: task.evaluate(gx, gy, device), eval_every=run.eval_every,
        first_round=resumed.iteration + 1 if resumed else 1, on_round_end=checkpoint,
    )
    writer.save_model(strategy.server.x, strategy.server.y)
    writer.log({"phase": "done", "iteration": algo.iterations, "wall_time": time.perf_counter() - started})
    log(INFO, "results in %s", writer.directory.resolve())
