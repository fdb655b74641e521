"""FLOPs counted once per unit and shape, then reused, add up to exactly a full count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clients import Client
from rabo_flwr.cost import CostMeter
from rabo_flwr.federation import ServerState
from rabo_flwr.masks import scenario_policies
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def meter_for_phase(scenario_path: Path, overrides: dict, phase: str, capacity: float, cache: bool) -> tuple[CostMeter, int]:
    """Run one client's phase with a meter, under a full FLOP count; return the meter and the full count."""
    scenario = load_scenario(scenario_path, overrides)
    task = cached_task(scenario)
    x, y = task.init_tensors(scenario.seed)
    state = ServerState(task.layouts, x, y, scenario_policies(scenario))
    state.plan_iteration(1, {0: capacity})
    client = Client(task, scenario, 0, CPU)
    sends = {"inner": ("x", "y"), "outer": ("x", "y"), "local": ("x", "y")}[phase]
    captured = {}
    real_meter = CostMeter

    class Capturing(real_meter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs | {"cache": cache})
            captured["meter"] = self

    import clients.client as module

    module.CostMeter = Capturing
    try:
        with FlopCounterMode(display=False) as full:
            client.run(phase, 1, state.slices(0, sends))
    finally:
        module.CostMeter = real_meter
    return captured["meter"], full.get_total_flops()


@pytest.mark.parametrize("overrides,phase", [
    ({"algorithm.name": "rabo"}, "inner"),
    ({"algorithm.name": "rabo"}, "outer"),  # conjugate gradient: a varying number of products
    ({"algorithm.name": "rafbo", "algorithm.estimator_options": {"num_coords": 8}}, "outer"),
    ({"algorithm.name": "fedmbo", "clients.capacities": [1.0]}, "outer"),  # power iteration + Neumann
    ({"algorithm.name": "fiarse", "task.labels": "global", "algorithm.inner_steps": 3}, "local"),
    ({"algorithm.name": "dist-maml", "clients.capacities": [1.0], "algorithm.inner_steps": 2}, "local"),
])
def test_cached_unit_counts_add_up_to_the_full_count(overrides, phase):
    base = {"model.width": 8, "clients.num": 2, "algorithm.inner_steps": 4} | overrides
    path = REPO / "scenarios" / "quickstart.yaml"
    first, full_first = meter_for_phase(path, base, phase, 0.5 if "capacities" not in overrides else 1.0, cache=True)
    again, full_again = meter_for_phase(path, base, phase, 0.5 if "capacities" not in overrides else 1.0, cache=True)
    assert first.flops == full_first > 0
    assert again.flops == full_again == full_first
    assert again.units_counted == 0  # every unit was known: nothing ran under the counter the second time
    uncached, full = meter_for_phase(path, base, phase, 0.5 if "capacities" not in overrides else 1.0, cache=False)
    assert uncached.flops == full == full_first


def test_count_flops_off_reports_minus_one():
    meter = CostMeter(CPU, count_flops=False)
    with meter:
        assert meter.unit("matmul", (), lambda: torch.ones(3, 3) @ torch.ones(3, 3)).sum() == 27
    assert meter.metrics()["flops"] == -1.0 and meter.units_counted == 0
