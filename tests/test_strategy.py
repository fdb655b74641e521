"""The Flower message path (real strategy, real ClientApp dispatch, in-process grid) against the plain
engine, and what the loop does with faults, bad replies, capacities, checkpoints and node profiles."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, Context, Message, RecordDict

from rabo_flwr import server_app
from rabo_flwr.loop import SERVER_THREADS, PlainRunner, TrainingLoop, run_plain
from rabo_flwr.masks import build_plan, scenario_policies
from rabo_flwr.protocol import CONFIG, METRICS, PARTITION, update_key
from rabo_flwr.results import read_metrics
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario
from rabo_flwr.submodel import numel_in_plan
from rabo_flwr.threads import part_thread_count
from strategies import Rabo
from tests.inprocess_grid import InProcessGrid

REPO = Path(__file__).resolve().parent.parent
TINY = {"model": {"width": 8}, "task": {"eval_episodes": 8, "val_episodes": 8, "eval_steps": 5},
        "algorithm": {"iterations": 2, "inner_steps": 2}, "clients": {"num": 3}}
VOLATILE = {"wall_time", "client_wall_time_max", "aggregation_time", "eval_time", "peak_memory"}


def tiny_scenario(tmp_path: Path, **sections) -> Path:
    """quickstart.yaml, shrunk, with the given sections merged in; written to tmp_path."""
    data = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    for section, values in {**TINY, **sections}.items():
        data.setdefault(section, {}).update(values)
    data.setdefault("run", {})["results_dir"] = str(tmp_path / "results")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def one_thread():
    """The in-process grid runs its clients inside the loop's server work (one torch thread); plain
    runs compared with it must run their clients on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_flower(path: Path, overrides: dict | None = None, num_nodes: int = 3, **grid_kwargs) -> list[dict]:
    run_config = {"scenario": str(path), **(overrides or {})}
    grid = InProcessGrid(run_config, num_nodes, **grid_kwargs)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return read_metrics(load_scenario(path, overrides).results_path / "metrics.jsonl")


def stable(records: list[dict]) -> list[dict]:
    """Records without what depends on the machine's speed."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    return clean(records)


def phase_records(records, phase):
    return {r["iteration"]: r for r in records if r["phase"] == phase}


def test_plain_and_flower_engines_give_the_same_records_for_a_faulty_run(tmp_path, one_thread):
    """One loop: the same faulty scenario (a raising client, a NaN reply, a huge finite reply)
    through the Flower message path and the plain engine gives the same records and model."""
    faults = [{"partition": 0, "phase": "inner", "iterations": [1], "kind": "raise"},
              {"partition": 2, "phase": "outer", "iterations": [1], "kind": "nan"},
              {"partition": 1, "phase": "inner", "iterations": [2], "kind": "huge"}]
    flower = tiny_scenario(tmp_path / "flower", run={"faults": faults, "eval_every": 1})
    plain = tiny_scenario(tmp_path / "plain", run={"faults": faults, "eval_every": 1})
    flower_records = run_flower(flower)
    plain_records = run_plain(load_scenario(plain), logging.getLogger("quiet")).records
    assert stable(flower_records) == stable(plain_records)
    inner, outer = phase_records(plain_records, "inner"), phase_records(plain_records, "outer")
    assert (inner[1]["failures"], inner[1]["clients_aggregated"]) == (1, 2)
    assert (outer[1]["rejected"], outer[1]["rejected_divergent"], outer[1]["clients_aggregated"]) == (1, 0, 2)
    assert (inner[2]["rejected"], inner[2]["rejected_divergent"], inner[2]["clients_aggregated"]) == (1, 1, 2)
    # every reply's work is counted: the rejected ones as wasted, the raised one estimated (no size seen before)
    assert outer[1]["wasted_flops"] > 0 and outer[1]["flops"] > outer[1]["wasted_flops"]
    assert inner[1]["unestimated_failures"] == 1 and inner[2]["wasted_flops"] > 0
    a, b = (torch.load(p.parent / "results" / "model.pt") for p in (flower, plain))
    assert all(torch.equal(a[s][n], b[s][n]) for s in a for n in a[s])


def test_divergence_guard_keeps_the_model_where_the_huge_update_would_have_thrown_it(tmp_path):
    """A finite update a million times too large is rejected; with the guard off it is averaged in."""
    faults = [{"partition": 1, "phase": "outer", "iterations": [1], "kind": "huge"}]
    guarded = run_plain(load_scenario(tiny_scenario(tmp_path / "on", run={"faults": faults})), logging.getLogger("quiet"))
    unguarded = run_plain(load_scenario(tiny_scenario(tmp_path / "off", run={"faults": faults, "divergence_factor": 0.0})),
                          logging.getLogger("quiet"))
    on, off = phase_records(guarded.records, "outer")[1], phase_records(unguarded.records, "outer")[1]
    assert (on["rejected_divergent"], on["clients_aggregated"]) == (1, 2)
    assert (off["rejected_divergent"], off["clients_aggregated"]) == (0, 3)
    size = lambda state: max(float(t.abs().max()) for t in state.x.values())  # noqa: E731
    assert size(unguarded.state) > 1e3 * size(guarded.state)


@pytest.mark.parametrize("kind,reason", [
    ("names", "wrong array names"), ("shape", "shape"), ("inf", "NaN or infinite"), ("dtype", "dtype"),
    ("records", "missing update"), ("side", "sides this phase does not step"),
])
def test_bad_replies_are_rejected_not_aggregated(tmp_path, kind, reason, caplog):
    """Partition 1's replies are spoiled on their way back; the loop must drop exactly those."""

    def spoil(message: Message, reply: Message) -> Message:
        if not message.metadata.message_type.startswith("train") or message.content[CONFIG][PARTITION] != 1:
            return reply
        (key,) = [k for k in reply.content.array_records]
        update = reply.content[key].to_torch_state_dict()
        name = next(iter(update))
        if kind == "names":
            update[name + ".bogus"] = update.pop(name)
        elif kind == "shape":
            update[name] = update[name][..., :1].contiguous() if update[name].ndim else torch.zeros(2)
        elif kind == "inf":
            update[name] = torch.full_like(update[name], float("inf"))
        elif kind == "dtype":
            update[name] = update[name].to(torch.int32)
        content = RecordDict({METRICS: reply.content[METRICS]})
        if kind == "side":
            content[update_key("x" if key == update_key("y") else "y")] = ArrayRecord(update)
        if kind not in ("records", "side"):
            content[key] = ArrayRecord(update)
        return Message(content, reply_to=message)

    with caplog.at_level(logging.WARNING):
        records = run_flower(tiny_scenario(tmp_path), tamper=spoil)
    for phase in ("inner", "outer"):
        for r in phase_records(records, phase).values():
            assert (r["rejected"], r["clients_aggregated"]) == (1, 2)
            assert sorted(c["partition"] for c in r["clients"]) == [0, 2]
            assert math.isfinite(r["lower_loss" if phase == "inner" else "upper_loss"])
    assert reason in caplog.text
    model = torch.load(tmp_path / "results" / "model.pt")
    assert all(torch.isfinite(t).all() for side in model.values() for t in side.values())


def test_client_faults_are_counted_and_coverage_uses_survivors(tmp_path):
    """Partition 0 (capacity 1) raises in iteration 1's inner phase: that iteration aggregates the
    others, and coverage shrinks to what they hold; elements nobody covered keep their value."""
    path = tiny_scenario(tmp_path, run={"faults": [{"partition": 0, "phase": "inner", "iterations": [1], "kind": "raise"}]},
                         algorithm={"iterations": 2, "inner_steps": 2, "mask_y": "static", "mask_x": "static"},
                         clients={"num": 3, "capacities": [1.0, 0.5, 0.25]}, model={"width": 8, "head": "mlp", "head_hidden": 8})
    records = run_flower(path)
    inner, outer = phase_records(records, "inner"), phase_records(records, "outer")
    assert (inner[1]["failures"], inner[1]["clients_aggregated"]) == (1, 2)
    # without the full-capacity client only the first 4 of 8 features and hidden units are held:
    # fc1.weight 16 of 64, fc1.bias 4 of 8, fc2.weight 20 of 40, fc2.bias 5 of 5 -> 72 of 117 uncovered
    assert inner[1]["uncovered_y"] == pytest.approx(72 / 117) and inner[2]["uncovered_y"] == 0
    assert inner[1]["trained_y"] == pytest.approx(1 - inner[1]["uncovered_y"]) and inner[2]["trained_y"] == 1.0
    assert outer[1]["C_x*"] == 1 and outer[1]["uncovered_x"] == 0


def expected_elements(path: Path, capacity: float, iteration: int, overrides=None) -> int:
    scenario = load_scenario(path, overrides)
    task = cached_task(scenario)
    x, y = task.init_tensors(0)
    policies = scenario_policies(scenario)
    for policy in policies.values():  # masks that rank channels look at the model of that iteration
        policy.begin_round(iteration, x | y, task.layouts, {})
    plan = build_plan(task.layouts, policies, capacity, iteration, 0)
    return numel_in_plan(x, task.layouts["x"], plan)


def test_capacity_changes_give_matching_submodels(tmp_path):
    """A scheduled change of the resource profile, and a node announcing its own capacity."""
    path = tiny_scenario(tmp_path, clients={"num": 3, "capacities": [1.0, 0.5, 0.25],
                                            "schedule": [{"from_iteration": 2, "capacities": [0.25, 0.25, 1.0]}]},
                         algorithm={"iterations": 2, "inner_steps": 2, "mask_x": "static", "mask_y": "static"})
    records = run_flower(path, node_configs={1: {"capacity": 0.125}})
    inner = phase_records(records, "inner")
    got = {q: {c["partition"]: (c["capacity"], c["x_elements"]) for c in inner[q]["clients"]} for q in (1, 2)}
    size = lambda r: (r, expected_elements(path, r, 1))  # noqa: E731
    assert got[1] == {0: size(1.0), 1: size(0.125), 2: size(0.25)}
    assert got[2] == {0: size(0.25), 1: size(0.125), 2: size(1.0)}


def test_resume_from_checkpoint_ends_with_the_same_model(tmp_path):
    straight = tiny_scenario(tmp_path / "a", algorithm={"iterations": 4, "inner_steps": 2}, run={"checkpoint_every": 2})
    run_flower(straight)
    interrupted = tiny_scenario(tmp_path / "b", algorithm={"iterations": 4, "inner_steps": 2}, run={"checkpoint_every": 2})
    run_flower(interrupted, {"algorithm.iterations": 2})  # stops after the checkpoint at iteration 2
    assert torch.load(tmp_path / "b" / "results" / "checkpoint.pt")["iteration"] == 2
    resumed = run_flower(interrupted, {"run.resume": True})
    a = torch.load(tmp_path / "a" / "results" / "model.pt")
    b = torch.load(tmp_path / "b" / "results" / "model.pt")
    assert all(torch.equal(a[side][name], b[side][name]) for side in a for name in a[side])
    losses = lambda rs: [(r["iteration"], r["phase"], r.get("upper_loss"), r.get("lower_loss"), r.get("trained_x"))  # noqa: E731
                         for r in rs if r["phase"] in ("inner", "outer")]
    assert losses(resumed) == losses(read_metrics(tmp_path / "a" / "results" / "metrics.jsonl"))


def test_resume_without_checkpoint_stops_before_training(tmp_path):
    path = tiny_scenario(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        run_flower(path, {"run.resume": True})
    assert not (tmp_path / "results" / "metrics.jsonl").exists()


@pytest.mark.parametrize("node_configs,message", [
    ({1: {"capacity": 1.5}}, "announced capacity 1.5 outside (0, 1]"),
    ({1: {"partition-id": 0}}, "announced partition 0, which another node already has"),
])
def test_nodes_with_impossible_profiles_are_left_out(tmp_path, caplog, node_configs, message):
    with caplog.at_level(logging.WARNING):
        records = run_flower(tiny_scenario(tmp_path), node_configs=node_configs, overrides={"clients.min_available": 2})
    for r in phase_records(records, "inner").values():
        assert r["clients_sent"] == 2 and sorted(c["partition"] for c in r["clients"]) == [0, 2]
    assert message in caplog.text


def test_simulation_nodes_serve_every_partition_whatever_their_number(tmp_path, one_thread):
    """Flower's default simulation has 2 SuperNodes: 5 clients still run, a round's messages spread over
    the nodes, with the same records as one node per partition."""
    path = tiny_scenario(tmp_path / "virtual", clients={"num": 5})
    scenario = load_scenario(path)
    grid = InProcessGrid({"scenario": str(path)}, num_nodes=2)
    strategy = Rabo(scenario, virtual_clients=True)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=2 * scenario.algorithm.iterations)
    records = read_metrics(scenario.results_path / "metrics.jsonl")
    sent = [m for m in grid.sent if m.metadata.message_type == "train.inner" and m.metadata.group_id == "1"]
    assert sorted((m.content[CONFIG][PARTITION], m.metadata.dst_node_id) for m in sent) == \
        [(0, 101), (1, 102), (2, 101), (3, 102), (4, 101)]
    direct = run_flower(tiny_scenario(tmp_path / "direct", clients={"num": 5}), num_nodes=5)
    assert stable(records) == stable(direct)


def test_a_sampled_round_is_spread_over_the_nodes_when_clients_keep_no_state(tmp_path, one_thread):
    """Flower's simulation takes one message per node per tick: 4 sampled clients of 8 on 2 nodes go 2 and
    2 in every round, even where the sampled partitions are not half odd (partition mod nodes would pile
    them up; that rule is kept for clients that keep state, which need a node per partition)."""
    path = tiny_scenario(tmp_path, clients={"num": 8, "fraction": 0.5}, algorithm={"iterations": 4, "inner_steps": 2})
    scenario = load_scenario(path)
    grid = InProcessGrid({"scenario": str(path)}, num_nodes=2)
    strategy = Rabo(scenario, virtual_clients=True)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=2 * scenario.algorithm.iterations)
    rounds: dict[str, list] = {}
    for m in grid.sent:
        if m.metadata.message_type.startswith("train."):
            rounds.setdefault(f"{m.metadata.message_type} {m.metadata.group_id}", []).append(m)
    assert len(rounds) == 2 * scenario.algorithm.iterations
    for messages in rounds.values():
        nodes = [m.metadata.dst_node_id for m in messages]
        assert len(messages) == 4 and sorted(nodes) == [101, 101, 102, 102]
    parities = [sorted(m.content[CONFIG][PARTITION] % 2 for m in messages) for messages in rounds.values()]
    assert any(p != [0, 0, 1, 1] for p in parities)  # some round would have piled up under partition mod nodes


def test_a_reply_without_a_flop_count_is_left_out_of_the_sum_and_counted(tmp_path, caplog):
    """Partition 0 replies flops = -1 (not counted): each phase sums the other replies' FLOPs and
    says one reply had none, instead of recording -1 for the whole phase."""
    scenario = load_scenario(tiny_scenario(tmp_path))
    task = cached_task(scenario)
    plain = PlainRunner(scenario, task, torch.device("cpu"))

    class FirstUncounted:
        partitions = plain.partitions
        client_states = plain.client_states

        def run_phase(self, phase_round):
            finish = phase_round.finish

            def first_uncounted(outcomes):
                outcomes[0].metrics["flops"] = -1.0
                return finish(outcomes)

            phase_round.finish = first_uncounted
            plain.run_phase(phase_round)

    with caplog.at_level(logging.INFO, logger="rabo_flwr"):
        records = TrainingLoop(scenario, task, FirstUncounted(), torch.device("cpu")).run().records
    phases = [r for r in records if r["phase"] in ("inner", "outer")]
    for r in phases:
        assert r["uncounted_replies"] == 1 and r["clients"][0]["flops"] == -1
        assert r["flops"] == sum(c["flops"] for c in r["clients"][1:]) > 0
    assert f"{len(phases)} replies without a FLOP count" in caplog.text


def test_server_work_runs_on_one_thread_and_plain_clients_on_the_process_count(tmp_path, monkeypatch):
    """The same server thread count in both engines (the ServerApp has no setting of its own); the
    evaluation's independent parts may use the run's threads (their numbers do not depend on it)."""
    seen = {"server": set(), "client": set(), "evaluation parts": set()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        scenario = load_scenario(tiny_scenario(tmp_path, algorithm={"iterations": 1, "inner_steps": 1}))
        task = cached_task(scenario)
        evaluate, step = task.evaluate, TrainingLoop._finish_phase
        monkeypatch.setattr(task, "evaluate", lambda *a: seen["server"].add(torch.get_num_threads())
                            or seen["evaluation parts"].add(part_thread_count()) or evaluate(*a))
        monkeypatch.setattr(TrainingLoop, "_finish_phase",
                            lambda self, *a: seen["server"].add(torch.get_num_threads()) or step(self, *a))
        plain = PlainRunner(scenario, task, torch.device("cpu"))
        run_client = plain._run_client
        monkeypatch.setattr(plain, "_run_client", lambda *a: seen["client"].add(torch.get_num_threads()) or run_client(*a))
        TrainingLoop(scenario, task, plain, torch.device("cpu")).run()
        assert seen == {"server": {SERVER_THREADS}, "client": {2}, "evaluation parts": {2}}
        assert torch.get_num_threads() == 2 and part_thread_count() == 1
    finally:
        torch.set_num_threads(threads)


def test_fiarse_thresholds_travel_in_flower_messages_as_in_the_plain_engine(tmp_path, one_thread):
    """FIARSE's per-tensor thresholds go with the slices: the Flower message path and the plain
    engine give the same records and model, and the bytes sent include them."""
    settings = {"algorithm": {"name": "fiarse", "iterations": 2, "inner_steps": 2}, "task": {"labels": "global"}}
    flower, plain = (tiny_scenario(tmp_path / engine, **settings) for engine in ("flower", "plain"))
    flower_records = run_flower(flower)
    plain_records = run_plain(load_scenario(plain), logging.getLogger("quiet")).records
    assert stable(flower_records) == stable(plain_records)
    local = phase_records(plain_records, "local")
    assert all(r["clients_aggregated"] == 3 and r["rejected"] == 0 for r in local.values())
    for c in local[1]["clients"]:  # x and y slices, float32, and one float32 threshold per weight tensor (4 convs, head)
        assert c["bytes_down"] == 4 * (c["x_elements"] + c["y_elements"] + 5)
    a, b = (torch.load(p.parent / "results" / "model.pt") for p in (flower, plain))
    assert all(torch.equal(a[s][n], b[s][n]) for s in a for n in a[s])


def test_segments_travel_in_flower_messages_as_in_the_plain_engine(tmp_path, one_thread):
    """A segment client is sent x and y whole and its plan (int64 indices) and returns its held
    elements: the Flower message path and the plain engine give the same records and model, and the
    bytes down are the whole model's plus the plan's."""
    settings = {"algorithm": {"submodel": "segment", "iterations": 2, "inner_steps": 2}}
    flower, plain = (tiny_scenario(tmp_path / engine, **settings) for engine in ("flower", "plain"))
    flower_records = run_flower(flower)
    plain_records = run_plain(load_scenario(plain), logging.getLogger("quiet")).records
    assert stable(flower_records) == stable(plain_records)
    task = cached_task(load_scenario(plain))
    whole = sum(t.numel() for side in task.init_tensors(0) for t in side.values())
    outer = phase_records(plain_records, "outer")
    assert all(r["clients_aggregated"] == 3 and r["rejected"] == 0 for r in outer.values())
    for c in outer[1]["clients"]:  # float32 tensors, int64 kept indices of the 4 groups of width 8
        kept = 4 * math.ceil(c["capacity"] * 8)
        assert c["bytes_down"] == 4 * whole + 8 * kept and c["bytes_up"] == 4 * c["x_elements"]
    a, b = (torch.load(p.parent / "results" / "model.pt") for p in (flower, plain))
    assert all(torch.equal(a[s][n], b[s][n]) for s in a for n in a[s])


def test_the_message_contract_names_each_key_once():
    """protocol.py is the one place for each record key: a name assigned twice (PHASE was) could drift apart."""
    import ast
    import collections

    from rabo_flwr import protocol

    tree = ast.parse(Path(protocol.__file__).read_text())
    names = [target.id for node in tree.body if isinstance(node, ast.Assign) for target in ast.walk(node)
             if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store)]
    assert [n for n, count in collections.Counter(names).items() if count > 1] == []
