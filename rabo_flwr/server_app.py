"""ServerApp: resolve the scenario, hand the training loop a Flower-backed phase runner."""

from __future__ import annotations

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from strategies import PhaseStrategy

from .loop import TrainingLoop
from .runtime import cached_task, choose_device
from .scenario import scenario_from_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = scenario_from_run_config(context.run_config)  # fails here, before any work, on bad input
    clients, run = scenario.clients, scenario.run
    strategy = PhaseStrategy(
        grid, clients=clients.num, min_available=clients.min_available or clients.num,
        virtual_clients=isinstance(grid, InMemoryGrid),  # Flower's simulation engine
        node_wait_timeout=run.node_wait_timeout, phase_timeout=run.phase_timeout,
    )
    TrainingLoop(scenario, cached_task(scenario), strategy, choose_device(scenario), FLOWER_LOGGER).run()
