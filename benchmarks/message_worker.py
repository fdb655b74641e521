"""One deployment message in a fresh process, stage by stage (used by ``bench.py``'s part 5).

    python benchmarks/message_worker.py '{"phase": "inner", "run_config": {...}, "out": "stages.json"}'

It imports nothing before its first stage, so the stages are those of a deployment's ClientApp
process: Flower, torch, this project, then the handler (scenario, task, data, the phase).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # clients/ and strategies/ are top-level packages


def main(spec: dict) -> None:
    """In a fresh process, as a deployment's ClientApp process: one message of ``spec["phase"]``
    for partition 0 through the real ClientApp, each stage timed (Flower's transport left out)."""
    stages, last = {}, time.perf_counter()

    def lap(name):
        nonlocal last
        now = time.perf_counter()
        stages[name], last = now - last, now

    import flwr.app  # noqa: F401 - what flwr-clientapp imports before the app
    import flwr.clientapp  # noqa: F401
    lap("flwr_import_s")
    import torch as _torch  # noqa: F401
    lap("torch_import_s")
    from rabo_flwr import client_app
    lap("app_import_s")
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from rabo_flwr.federation import ServerState
    from rabo_flwr.masks import scenario_policies
    from rabo_flwr.scenario import scenario_from_run_config
    from rabo_flwr.tasks import build_task

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run_config = spec["run_config"]
    scenario = scenario_from_run_config(run_config)  # the server's side of the message, not timed
    server_task = build_task(scenario)
    x, y = server_task.init_tensors(scenario.seed)
    state = ServerState(server_task.layouts, x, y, scenario_policies(scenario))
    state.plan_iteration(1, {0: 1.0})
    content = RecordDict({side: ArrayRecord({k: v.contiguous() for k, v in t.items()})
                          for side, t in state.slices(0).items()})
    content["config"] = ConfigRecord({"iteration": 1, "partition": 0, "capacity": 1.0})
    message = Message(content, dst_node_id=1, message_type=f"train.{spec['phase']}", group_id="1")
    message.metadata.__dict__["_message_id"] = "bench"
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)
    del server_task
    last = time.perf_counter()
    reply = client_app.app(message, context)
    lap("handle_s")
    metrics = dict(reply.content["metrics"])
    Path(spec["out"]).write_text(json.dumps(stages | {"client_run_s": metrics["wall_time"], "flops": metrics["flops"]}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
