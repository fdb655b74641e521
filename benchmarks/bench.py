"""Speed and accuracy benchmarks of rabo_flwr on this machine, in one run.

    . ./offline.env && python benchmarks/bench.py [--quick] [--out benchmarks/results.json]

1. Flower overhead: time per global iteration of a real ``flwr run`` simulation (Ray) against
   the same scenario in the plain engine (``rabo_flwr.loop.run_plain``), plus start-up cost,
   and what counting FLOPs costs (counted once per unit and shape, then reused) against not counting.
2. Hypergradient estimators: time, gradient evaluations, peak memory and error against
   ``exact`` at one client's (x, y) and batch, for every task that exists.
   At the same parallelism too: Flower with one actor against the sequential plain engine.
3. Time per iteration against the number of clients and against capacity (plain loop).
4. Many clients: time per iteration and server memory as clients grow, 10 sampled each time
   (``flwr run`` up to 1,000 clients, the plain engine up to 10,000), and a figure of both.
5. Edge deployment: phase times of the README's trial (SuperLink and 3 SuperNodes on this
   machine) and one message's stages in a fresh process (imports, task and data, the phase).
6. Both cores in one run: the plain engine's 10-client iteration with ``run.workers: 2`` (two
   worker processes of one torch thread) against the clients one after another (one thread).
7. Compute (``--parts compute``, not in the default set): one evaluation of the published
   Table II scenario at CPU scale, RABO's and FedMBO's phase time per iteration, one client's
   outer and inner phase at capacity 1 and 1/16, measured on this tree and on ``--before DIR``
   (a checkout of an earlier commit) alternately, each in a fresh process, with the runs'
   records compared.
8. Max-pooling (``--parts pooling``, not in the default set): ``F.max_pool2d(x, 2)`` against
   ``models.units.max_pool2`` (the channels-last kernel above its size threshold) on what a
   Conv4 client of each capacity's width really pools (a 5-way 1-shot episode: 5 support and
   95 query images, 28 to 3 pixels): forward, backward with ``create_graph`` and double
   backward per call, and a client's outer-phase computation with each, thread CPU time.

Every process uses one torch thread (``--threads``): Flower's client actors get one CPU each
(``client-resources-num-cpus=1``, ``OMP_NUM_THREADS=1``), so the plain loop and the estimator
timings use the same per-client compute. Tests never measure speed; this file does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
# clients/ and strategies/ are top-level packages of the repo; a compute worker runs another tree's code
SOURCE = Path(os.environ.get("RABO_BENCH_SOURCE", REPO))
sys.path.insert(0, str(SOURCE))

from rabo_flwr.algorithms import ClientJob  # noqa: E402
from rabo_flwr.algorithms.bilevel import inner_phase  # noqa: E402
from rabo_flwr.cost import CostMeter  # noqa: E402
from rabo_flwr.flower_run import FlowerHome  # noqa: E402
from rabo_flwr.hypergrad import _sample_coords, hypergradient_with_stats  # noqa: E402
from rabo_flwr.loop import run_plain  # noqa: E402
from rabo_flwr.results import read_metrics  # noqa: E402
from rabo_flwr.runtime import cached_task  # noqa: E402
from rabo_flwr.scenario import load_scenario  # noqa: E402

QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
LOSS_TUNING = REPO / "scenarios" / "loss_tuning_mini.yaml"
CPU = torch.device("cpu")
TINY_EVAL = {"task.eval_episodes": 10, "task.val_episodes": 10, "task.eval_steps": 5}  # Flower always evaluates at 0 and the end


def settings(quick: bool) -> dict[str, Any]:
    """Sizes of every part; ``--quick`` exercises every code path in under two minutes."""
    if quick:
        return {"flower": {"clients.num": 3, "algorithm.iterations": 3, "model.width": 16},
                "plain_threads": [1], "repeats": 1, "resnet12_width": 8,
                "neumann_K": [5], "fd_coords": [16],
                "scaling_iterations": 2, "scaling_base": {"model.width": 16},
                "clients": [2, 4], "capacities": [1.0, 0.0625],
                "scale_iterations": 2, "scale_base": {"model.width": 16}, "scale_flower": [10, 100],
                "scale_plain": [10, 100],
                "parallel": {"overrides": {"clients.num": 4, "algorithm.iterations": 2, "model.width": 16}, "rounds": 1},
                "compute": {"eval_episodes": 20, "rounds": 1, "run": {"algorithm.iterations": 2, **TINY_EVAL}},
                "pooling": {"repeats": 3}}
    return {"flower": {"clients.num": 5, "algorithm.iterations": 10},
            "plain_threads": [1, 2], "repeats": 3, "resnet12_width": 16,
            "neumann_K": [5, 20], "fd_coords": [16, 64, 256, "all"],
            "scaling_iterations": 4, "scaling_base": {},
            "clients": [10, 20, 50], "capacities": [1.0, 0.5, 0.25, 0.125, 0.0625],
            "scale_iterations": 6, "scale_base": {}, "scale_flower": [10, 100, 1000],
            "scale_plain": [10, 100, 1000, 10000],
            "parallel": {"overrides": {"clients.num": 10, "algorithm.iterations": 6}, "rounds": 3},
            "compute": {"eval_episodes": 600, "rounds": 3, "run": {"algorithm.iterations": 4, **TINY_EVAL}},
            "pooling": {"repeats": 31}}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"cpu_model": model, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(int(mem) / 2**20, 1),
            "gpu": torch.cuda.is_available(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "flwr": importlib.metadata.version("flwr")}


def per_iteration(records: list[dict]) -> dict[str, Any]:
    """Wall time of each global iteration (inner + outer record) and the clients' compute in it.

    Iteration 1 carries warm-up (in Flower: each actor imports the ClientApp and builds the
    task), so the median over iterations is the steady-state figure.
    """
    wall, clients, phase = defaultdict(float), defaultdict(float), defaultdict(dict)
    for r in records:
        if r["phase"] in ("inner", "outer"):
            wall[r["iteration"]] += r["wall_time"]
            clients[r["iteration"]] += sum(c["wall_time"] for c in r["clients"])
            phase[r["phase"]][r["iteration"]] = r["wall_time"]
    its = sorted(wall)
    return {"iterations": [wall[q] for q in its], "median_s": statistics.median(wall.values()),
            "first_s": wall[its[0]], "total_s": sum(wall.values()),
            "median_clients_compute_s": statistics.median(clients.values()),
            **{f"median_{p}_s": statistics.median(phase[p].values()) for p in ("inner", "outer")}}


# ---------------------------------------------------------------- part 1: Flower overhead


def actors(count: int) -> dict[str, Any]:
    """Federation settings for ``count`` Ray actors of one CPU each (Ray told it has ``count`` CPUs)."""
    return {"client-resources-num-cpus": 1, "init-args-num-cpus": count}


class ServerMemory:
    """Peak resident memory (VmHWM) of the run's ``flwr-simulation`` process (ServerApp, Flower's
    simulation engine and Ray's driver), read from /proc every 0.2 s while the run lasts."""

    def __init__(self, home: FlowerHome):
        self.home, self.peak_bytes, self.stop = home, 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            for pid in self.home.leftovers():
                try:
                    if b"flwr-simulation" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                hwm = next((int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmHWM:")), 0)
                self.peak_bytes = max(self.peak_bytes, hwm)

    def __enter__(self) -> "ServerMemory":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def flower_run(overrides: dict[str, Any], work: Path, federation: dict[str, Any] | None = None,
               scenario: Path = QUICKSTART) -> dict[str, Any]:
    """One ``flwr run`` (fresh SuperLink and Ray) of the scenario; times from its metrics.jsonl.

    ``federation`` defaults to one SuperNode per client and one CPU per actor (2 actors on 2 cores).
    """
    results = work / "flower-results"
    shutil.rmtree(results, ignore_errors=True)
    federation = federation or {"num-supernodes": overrides["clients.num"], "client-resources-num-cpus": 1}
    with FlowerHome(work / "flower", env={"OMP_NUM_THREADS": "1"}) as home, ServerMemory(home) as memory:
        start = time.perf_counter()
        outcome = home.run(REPO, run_config={"scenario": str(scenario), **overrides, "run.results_dir": str(results)},
                           federation_config=federation, timeout=900)
        whole = time.perf_counter() - start
    if outcome.status != "finished:completed":
        raise RuntimeError(f"flwr run ended {outcome.status}:\n{outcome.log[-3000:]}")
    records = read_metrics(results / "metrics.jsonl")
    out = per_iteration(records)
    evaluation = sum(r.get("eval_time", 0.0) for r in records if r["phase"] == "eval")
    # Everything outside the iterations and the server's evaluation: SuperLink and Ray start,
    # app loading, node registration, shutdown.
    return out | {"flwr_run_s": whole, "eval_s": evaluation, "startup_s": whole - out["total_s"] - evaluation,
                  "first_iteration_excess_s": out["first_s"] - out["median_s"], "federation": federation,
                  "server_peak_rss_mib": memory.peak_bytes / 2**20}


def plain_run(overrides: dict[str, Any], threads: int, work: Path, scenario_path: Path = QUICKSTART,
              traced: bool = False) -> dict[str, Any]:
    """``run_plain`` in this process, data loaded beforehand so iteration 1 times no decoding;
    ``traced``: also the peak of Python's allocations during the run (tracemalloc, slower)."""
    torch.set_num_threads(threads)
    scenario = load_scenario(scenario_path, overrides | {"run.results_dir": str(work / "plain-results")})
    cached_task(scenario).prepare()
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        records = run_plain(scenario, logging.getLogger("bench")).records
        peak = tracemalloc.get_traced_memory()[1] if traced else None
    finally:
        tracemalloc.stop()
    out = per_iteration(records) | {"run_s": time.perf_counter() - start}
    return out | ({"peak_traced_mib": peak / 2**20} if traced else {})


def flower_overhead(cfg: dict[str, Any], threads: int, work: Path) -> dict[str, Any]:
    """Flower against the plain engine, and counting FLOPs (cached, the default) against not counting.

    At the same parallelism: Flower with one actor (Ray given one CPU) runs one client at a time
    with one thread, as the sequential plain engine with one torch thread does; the two runs
    alternate (plain, Flower, plain) and the Flower row is compared with the mean of the two
    plain runs around it, so a change of the machine's load between them shows as their spread.
    The uncounted run goes first, so the counted one cannot profit from a warm FLOP cache.
    """
    overrides = cfg["flower"] | TINY_EVAL
    uncounted = plain_run(overrides | {"run.count_flops": False}, 1, work)
    before = plain_run(overrides, 1, work)
    one_actor = flower_run(overrides, work, {"num-supernodes": overrides["clients.num"], **actors(1)})
    after = plain_run(overrides, 1, work)
    plain_mean = (before["median_s"] + after["median_s"]) / 2
    one_actor |= {"plain_before_s": before["median_s"], "plain_after_s": after["median_s"],
                  "flower_over_plain": one_actor["median_s"] / plain_mean}
    flower = flower_run(overrides, work)
    plain = {t: plain_run(overrides, t, work) for t in cfg["plain_threads"]}
    torch.set_num_threads(threads)
    return {"scenario": str(QUICKSTART.relative_to(REPO)), "overrides": overrides, "flower": flower,
            "flower_one_actor": one_actor,
            "plain": {f"{t}_threads": p | {"flower_over_plain": flower["median_s"] / p["median_s"]}
                      for t, p in plain.items()},
            "flops_not_counted": uncounted | {"counted_over_uncounted": plain[1]["median_s"] / uncounted["median_s"]}}


# ---------------------------------------------------------------- part 2: hypergradient estimators


def estimator_configs(cfg: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(label, method, options, inside CostMeter). ``fd-target`` is fd-coordinate's own target,
    grad_x f - beta H_xy grad_y f, by autograd (a Neumann series of one term with step beta);
    a step of 0 leaves grad_x f alone, the baseline that ignores y's dependence on x."""
    return ([("exact", "exact", {"max_iter": 100, "tol": 1e-10}, None),
             ("grad_x f only", "neumann", {"K": 1, "step": 0.0}, None),
             ("exact, FLOPs counted once per unit (default)", "exact", {"max_iter": 100, "tol": 1e-10}, True),
             ("exact, FLOPs counted every call", "exact", {"max_iter": 100, "tol": 1e-10}, False)]
            + [(f"neumann K={k} (power-iteration step)", "neumann", {"K": k}, None) for k in cfg["neumann_K"]]
            + [("fd-coord target (autograd)", "fd-target", {}, None)]
            + [(f"fd-coordinate n={n} ({weight})", "fd-coordinate", {"num_coords": n, "weight": weight}, None)
               for n in cfg["fd_coords"] for weight in ("paper", "unbiased") if n != "all" or weight == "paper"]
            + [("fd-directional neumann K=10", "fd-directional", {"inverse": "neumann", "K": 10}, None),
               ("fd-directional one-step", "fd-directional", {"inverse": "one-step"}, None)])


def _memory_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def hypergradient_worker(spec: dict[str, Any]) -> None:
    """In a fresh process: one estimator at client 0's (x, y_T) on its iteration-1 batch.

    y_T is y after the scenario's inner steps from y_0 (``inner_phase``), as in a real outer
    phase. Peak memory: the kernel's resident high-water mark (VmHWM), reset to the current RSS
    after set-up through /proc/self/clear_refs, so it sees torch's CPU allocations (tracemalloc
    does not) and nothing from set-up or from another estimator.
    """
    torch.set_num_threads(spec["threads"])
    method, options = spec["method"], dict(spec["options"])
    scenario = load_scenario(spec["scenario"], spec["overrides"])
    algo = scenario.algorithm
    if method == "fd-target":
        method, options = "neumann", {"K": 1, "step": algo.beta}
    if method == "fd-coordinate":
        options.setdefault("beta", algo.beta)  # scale -beta, as the client sets it
    if method != "exact":
        options.setdefault("seed", 0)  # coordinate sample, power-iteration start
    task = cached_task(scenario)
    batch = task.client_batch(0, 1, CPU, algo.inner_steps)
    x, y = task.init_tensors(scenario.seed)
    meter = CostMeter(CPU, count_flops=False)
    step = inner_phase(ClientJob(task, scenario, 0, 1, CPU, x, y, meter), algo.inner_steps, algo.beta).updates["y"]
    y = {k: y[k] - algo.beta * step[k] for k in y}
    xn, yn = list(x), list(y)

    def upper(xs, ys):
        return task.upper_loss(dict(zip(xn, xs)), dict(zip(yn, ys)), batch.upper)

    def lower(xs, ys):
        return task.lower_loss(dict(zip(xn, xs)), dict(zip(yn, ys)), batch.lower)

    def once():
        start = time.perf_counter()
        meter = None if spec["meter"] is None else CostMeter(CPU, cache=spec["meter"])
        out = hypergradient_with_stats(upper, lower, list(x.values()), list(y.values()), method, meter, **options)
        return time.perf_counter() - start, out

    try:
        Path("/proc/self/clear_refs").write_text("5")
        baseline = _memory_kib("VmRSS")
    except OSError:
        baseline = None
    _, (grads, stats) = once()  # warm-up, counted in the peak
    times = [once()[0] for _ in range(spec["repeats"])]
    peak = (_memory_kib("VmHWM") - baseline) * 1024 if baseline is not None else None
    torch.save({"times": times, "stats": stats, "peak_bytes": peak, "options": options,
                "grad": torch.cat([g.reshape(-1) for g in grads]),
                "point": float(sum(t.sum() for t in y.values()) + sum(t.sum() for t in x.values()))}, spec["out"])


def errors(h: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    h, ref = h.double(), ref.double()
    return {"cosine": float(h @ ref / (h.norm() * ref.norm())), "rel_error": float((h - ref).norm() / ref.norm())}


def hypergradient_tasks(cfg: dict[str, Any]) -> list[tuple[str, Path, dict[str, Any], bool]]:
    """(label, scenario, overrides, whether fd-coordinate also runs on every coordinate): one
    gradient evaluation per coordinate is affordable for loss tuning's 30, not a backbone's 111,680."""
    w = cfg["resnet12_width"]
    return [("few-shot Conv4 w64", QUICKSTART, {}, False),
            (f"few-shot ResNet12 w{w}", QUICKSTART, {"model.backbone": "resnet12", "model.width": w}, False),
            ("loss-tuning Conv4 w8", LOSS_TUNING, {}, True)]


def hypergradient_benchmark(cfg: dict[str, Any], threads: int, work: Path) -> list[dict[str, Any]]:
    """Every estimator of every task, each in its own process (clean timing and peak memory)."""
    rows = []
    for task_label, scenario, overrides, every_coordinate in hypergradient_tasks(cfg):
        results = {}
        for label, method, options, meter in estimator_configs(cfg):
            if options.get("num_coords") == "all" and not every_coordinate:
                continue
            out = work / f"hg-{len(rows)}-{len(results)}.pt"
            spec = {"scenario": str(scenario), "overrides": overrides, "method": method, "options": options,
                    "meter": meter, "repeats": cfg["repeats"], "threads": threads, "out": str(out)}
            subprocess.run([sys.executable, __file__, "--hypergradient-worker", json.dumps(spec)], check=True)
            results[label] = torch.load(out)
            print(f"  {task_label}: {label} {statistics.median(results[label]['times']):.3f} s", flush=True)
        exact, target = results["exact"], results["fd-coord target (autograd)"]
        for label, r in results.items():
            assert r["point"] == exact["point"], "estimators saw different (x, y)"
            row = {"task": task_label, "estimator": label, "options": r["options"],
                   "time_s": statistics.median(r["times"]), "times_s": r["times"], **r["stats"],
                   "peak_mib": None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20,
                   "dim_x": r["grad"].numel(), "vs_exact": errors(r["grad"], exact["grad"])}
            row["grad_x_f_only_vs_exact"] = errors(results["grad_x f only"]["grad"], exact["grad"])
            if label.startswith("fd-coordinate"):
                row["vs_own_target"] = errors(r["grad"], target["grad"])
                # Sampling aside: the finite differences on the sampled coordinates P against the
                # autograd mixed term there (both estimates minus grad_x f; any dim/|P| weight removed).
                coords = _sample_coords(r["options"]["num_coords"], row["dim_x"], r["options"]["seed"])
                weight = row["dim_x"] / len(coords) if r["options"].get("weight") == "unbiased" else 1.0
                p, fx = torch.tensor(list(coords)), results["grad_x f only"]["grad"]
                row["fd_on_sampled"] = errors((r["grad"] - fx)[p] / weight, (target["grad"] - fx)[p])
            rows.append(row)
    return rows


# ---------------------------------------------------------------- part 3: clients and capacity


def scaling(cfg: dict[str, Any], threads: int, work: Path) -> dict[str, list[dict[str, Any]]]:
    """Plain-loop time per iteration as clients grow (quickstart's capacity tiers, round-robin)
    and as every client's capacity shrinks (5 clients). Omniglot has 30 background alphabets,
    so more clients than that are sharded by character."""
    base = cfg["scaling_base"] | {"algorithm.iterations": cfg["scaling_iterations"]}

    def run(overrides):
        return plain_run(base | overrides, threads, work)

    by_clients = [{"clients": n, **run({"clients.num": n, "task.shard_by": "character" if n > 30 else "alphabet"})}
                  for n in cfg["clients"]]
    by_capacity = [{"capacity": c, "clients": 5, **run({"clients.num": 5, "clients.capacities": [c]})}
                   for c in cfg["capacities"]]
    return {"clients": by_clients, "capacity": by_capacity}


# ---------------------------------------------------------------- part 4: many clients


def scale(cfg: dict[str, Any], threads: int, work: Path) -> dict[str, Any]:
    """Time per iteration and server memory against the number of clients, 10 sampled each time.

    ``flwr run`` with 10 SuperNodes and 2 actors: 10 clients at 100%, 100 at 10%, 1,000 at 1%;
    every client at capacity 1/2 (so the 10 sampled do the same work whichever they are), shards
    by character. Server memory: the flwr-simulation process's peak RSS (:class:`ServerMemory`).
    The plain engine over up to 10,000 clients gives the loop's own Python memory: the peak that
    ``tracemalloc`` sees during the run, data loaded beforehand (torch's tensor storage is not
    traced: the model and its slices are the same at every client count).
    """
    scenario = work / "scale.yaml"
    scenario.write_text(f"base: {QUICKSTART}\nclients:\n  capacities: [0.5]\ntask:\n  shard_by: character\n")
    base = cfg["scale_base"] | TINY_EVAL | {"algorithm.iterations": cfg["scale_iterations"]}
    flower = []
    for num in cfg["scale_flower"]:
        overrides = base | {"clients.num": num, "clients.fraction": 10 / num}
        try:
            row = flower_run(overrides, work, {"num-supernodes": 10, **actors(2)}, scenario)
        except RuntimeError as err:
            row = {"error": str(err)[-1500:]}
        flower.append({"clients": num, "fraction": 10 / num, **row})
        print(f"  flwr run, {num} clients: {row.get('median_s', row.get('error', '')[-200:])}", flush=True)
    plain = []
    for num in cfg["scale_plain"]:
        overrides = base | {"clients.num": num, "clients.fraction": 10 / num}
        try:
            row = plain_run(overrides, threads, work, scenario)
            row["loop_peak_traced_mib"] = plain_run(overrides | {"algorithm.iterations": 2}, threads, work, scenario,
                                                    traced=True)["peak_traced_mib"]
        except Exception as err:  # noqa: BLE001 - the code before this work could not shard 1,000 clients
            row = {"error": repr(err)[-1500:]}
        plain.append({"clients": num, "fraction": 10 / num, **row})
        print(f"  plain, {num} clients: {row.get('median_s', row.get('error', '')[-200:])}", flush=True)
    return {"flower": flower, "plain": plain}


def scale_figure(results: dict[str, Any], path: Path) -> None:
    """Time per iteration and server memory against the number of clients (10 sampled), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows, marker in (("flwr run (10 SuperNodes, 2 actors)", results["flower"], "o"),
                                ("plain engine", results["plain"], "s")):
        ok = [r for r in rows if "median_s" in r]
        left.plot([r["clients"] for r in ok], [r["median_s"] for r in ok], marker=marker, label=label)
    ok = [r for r in results["flower"] if "server_peak_rss_mib" in r]
    right.plot([r["clients"] for r in ok], [r["server_peak_rss_mib"] for r in ok], marker="o",
               label="flwr-simulation peak RSS (MiB)")
    ok = [r for r in results["plain"] if "loop_peak_traced_mib" in r]
    right.plot([r["clients"] for r in ok], [r["loop_peak_traced_mib"] for r in ok], marker="s",
               label="plain engine: loop's peak Python memory (MiB)")
    for axis, title in ((left, "time per iteration (s, median)"), (right, "server memory (MiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("clients (10 sampled per iteration)")
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- part 5: edge deployment

EDGE_RUN = {"clients.num": 3, "algorithm.iterations": 2, "model.width": 16, "algorithm.inner_steps": 3,
            "task.eval_episodes": 10}  # the README's trial on one machine
EDGE_CAPACITIES = (1.0, 0.5, 0.25)


def deployment(cfg: dict[str, Any], threads: int, work: Path) -> dict[str, Any]:
    """The README's edge trial (a SuperLink and 3 SuperNodes on this machine, each message in a
    fresh ClientApp process): phase times from its metrics.jsonl; then one message's stages in a
    fresh process, twice per phase (the second finds what the first left in the on-disk caches)."""
    from rabo_flwr.deployment import LocalDeployment

    env = {k: os.environ[k] for k in ("RABO_DATA_DIR", "RABO_CACHE_DIR") if k in os.environ} | {"OMP_NUM_THREADS": "1"}
    results = work / "edge-results"
    with LocalDeployment(work / "edge", env=env, connection="bench-edge") as dep:
        superlink = dep.start_superlink()
        for partition, capacity in enumerate(EDGE_CAPACITIES):
            dep.start_supernode(superlink, {"partition-id": partition, "capacity": capacity})
        dep.wait_for_nodes(len(EDGE_CAPACITIES))
        start = time.perf_counter()
        outcome = dep.run(REPO, EDGE_RUN | {"run.results_dir": str(results)}, timeout=1200)
        whole = time.perf_counter() - start
    if outcome.status != "finished:completed":
        raise RuntimeError(f"edge run ended {outcome.status}:\n{outcome.log[-3000:]}")
    phases = [r for r in read_metrics(results / "metrics.jsonl") if r["phase"] in ("inner", "outer")]
    run = {"flwr_run_s": whole, "phase_s": [r["wall_time"] for r in phases],
           "phase_clients_max_s": [r["client_wall_time_max"] for r in phases],
           "median_phase_s": statistics.median(r["wall_time"] for r in phases)}
    messages = []
    for repeat in range(2):
        for phase in ("inner", "outer"):
            out = work / f"message-{phase}-{repeat}.json"
            spec = {"phase": phase, "run_config": {"scenario": str(QUICKSTART), **EDGE_RUN}, "out": str(out)}
            start = time.perf_counter()
            subprocess.run([sys.executable, str(Path(__file__).with_name("message_worker.py")), json.dumps(spec)], check=True,
                           env=os.environ | {"OMP_NUM_THREADS": "1"})
            stages = json.loads(out.read_text())
            stages["process_s"] = time.perf_counter() - start
            stages["interpreter_and_exit_s"] = stages["process_s"] - sum(
                v for k, v in stages.items() if k.endswith("_import_s") or k == "handle_s")
            messages.append({"phase": phase, "repeat": repeat, **stages})
    return {"run_config": EDGE_RUN, "capacities": EDGE_CAPACITIES, "run": run, "messages": messages}
# ---------------------------------------------------------------- part 6: both cores


def parallel(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """The plain engine on quickstart with 10 clients: one client after another against
    ``run.workers: 2``, every process at 1 torch thread, alternated for ``rounds`` rounds so that
    both see the same load. The workers are spawned in iteration 1's first phase, so the median
    leaves their start-up out and ``first_s`` holds it."""
    overrides = cfg["parallel"]["overrides"] | TINY_EVAL
    rounds = []
    for _ in range(cfg["parallel"]["rounds"]):
        sequential, workers = plain_run(overrides, 1, work), plain_run(overrides | {"run.workers": 2}, 1, work)
        rounds.append({"sequential": sequential, "workers": workers,
                       "sequential_over_workers": sequential["median_s"] / workers["median_s"]})
    return {"scenario": str(QUICKSTART.relative_to(REPO)), "overrides": overrides, "rounds": rounds,
            "median_ratio": statistics.median(r["sequential_over_workers"] for r in rounds)}


# ---------------------------------------------------------------- part 7: compute


TABLE2 = REPO / "scenarios" / "paper" / "table2"
CPU_SCALE = {"model.backbone": "conv4", "model.width": 64, "task.n_way": 5, "task.k_shot": 1}  # Table II 5w1s, CPU scale
RECORD_TIMINGS = {"wall_time", "eval_time", "aggregation_time", "client_wall_time_max", "peak_memory"}


def _without_timings(value: Any) -> Any:
    """A record without its timings (and memory peaks): what a speed-up must leave unchanged."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in RECORD_TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _median_known(values) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _measure_cpu() -> dict[str, dict]:
    """Thread CPU time of every phase (the plain engine's clients and the server's step) and of every
    client's metered work, beside the records' wall times: the machine is shared, and CPU time is what
    other processes' load disturbs least. Wraps the plain engine and the meter in this process only."""
    from rabo_flwr import cost, loop

    times: dict[str, dict] = {"phases": {}, "clients": {}}
    run_phase, enter, exit_ = loop.PlainRunner.run_phase, cost.CostMeter.__enter__, cost.CostMeter.__exit__
    current: dict[str, Any] = {}

    def timed_phase(self, phase_round):
        current["phase"] = (phase_round.iteration, phase_round.phase.name)
        start = time.thread_time()
        run_phase(self, phase_round)
        times["phases"][current["phase"]] = time.thread_time() - start

    def timed_enter(self):
        self._cpu_start = time.thread_time()
        return enter(self)

    def timed_exit(self, *exc):
        result = exit_(self, *exc)
        current.setdefault("meters", []).append(time.thread_time() - self._cpu_start)
        return result

    def timed_client(client, phase, iteration, arrays, timeout):
        current["meters"] = []
        outcome = call_client(client, phase, iteration, arrays, timeout)
        if current["meters"]:
            times["clients"][(iteration, phase, client.partition)] = current["meters"][-1]
        return outcome

    call_client = loop.call_client
    loop.PlainRunner.run_phase, cost.CostMeter.__enter__, cost.CostMeter.__exit__ = timed_phase, timed_enter, timed_exit
    loop.call_client = timed_client
    return times


def compute_worker(spec: dict[str, Any]) -> None:
    """In a fresh process, with the code of ``RABO_BENCH_SOURCE``: one measurement of part 7."""
    import rabo_flwr

    torch.set_num_threads(spec["threads"])
    out: dict[str, Any] = {"source": str(Path(rabo_flwr.__file__).parent.parent), "loadavg_start": os.getloadavg()}
    if spec["what"] == "evaluation":
        scenario = load_scenario(TABLE2 / "rabo.yaml", CPU_SCALE | spec["overrides"])
        task = cached_task(scenario)
        task.prepare()
        x, y = task.init_tensors(scenario.seed)
        start, cpu = time.perf_counter(), time.process_time()
        try:  # as the loop calls it: its independent parts on the run's threads, where this tree has them
            from rabo_flwr.threads import part_threads
        except ImportError:
            part_threads = lambda count: contextlib.nullcontext()  # noqa: E731
        with part_threads(spec["threads"]):
            metrics = task.evaluate(x, y, CPU, "test")
        out |= {"time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, **metrics}
    else:
        scenario = load_scenario(TABLE2 / f"{spec['what']}.yaml", CPU_SCALE | spec["overrides"]
                                 | {"run.results_dir": str(Path(spec["work"]) / spec["what"])})
        cached_task(scenario).prepare()
        cpu = _measure_cpu()
        records = run_plain(scenario, logging.getLogger("bench")).records
        out |= per_iteration(records)
        out["records"] = _without_timings(records)
        clients = defaultdict(list)  # "phase capacity" -> [(wall, flops, cpu)] over iterations and clients
        for r in records:
            for c in r.get("clients", []) if isinstance(r.get("clients"), list) else []:
                clients[f"{r['phase']} {c['capacity']:g}"].append(
                    (c["wall_time"], c["flops"], cpu["clients"].get((r["iteration"], r["phase"], c["partition"]))))
        out["clients"] = {k: {"median_s": statistics.median(w for w, _, _ in v), "flops": statistics.median(f for _, f, _ in v),
                              "median_cpu_s": _median_known(t for _, _, t in v), "count": len(v)}
                          for k, v in clients.items()}
        phase_cpu = defaultdict(float)  # iteration -> CPU time of its phases (clients and the server's step)
        for (iteration, _), t in cpu["phases"].items():
            phase_cpu[iteration] += t
        out["iterations_cpu"] = [phase_cpu[q] for q in sorted(phase_cpu)]
        out["median_cpu_s"] = statistics.median(phase_cpu.values())
    out["loadavg"] = os.getloadavg()
    Path(spec["out"]).write_text(json.dumps(out))


def compute_benchmark(cfg: dict[str, Any], threads: int, before: Path | None, work: Path,
                      only: list[str] | None = None) -> dict[str, Any]:
    """Every measurement on ``before`` and on this tree ("after"), alternately, each in its own process.

    ``rounds`` rounds of (evaluation, RABO, FedMBO), each on both trees one after the other, so
    that both see the same load; ratios are taken within each round and the table gives medians.
    """
    trees = {"before": before, "after": REPO} if before else {"after": REPO}
    c = cfg["compute"]
    jobs = [("evaluation", {"task.eval_episodes": c["eval_episodes"]}), ("rabo", c["run"]), ("fedmbo", c["run"])]
    jobs = [(what, overrides) for what, overrides in jobs if only is None or what in only]
    results: dict[str, dict[str, list]] = {label: defaultdict(list) for label in trees}
    for _ in range(c["rounds"]):
        for what, overrides in jobs:
            for label, tree in trees.items():
                out = work / f"compute-{what}-{label}.json"
                spec = {"what": what, "overrides": overrides, "threads": threads, "work": str(work / label), "out": str(out)}
                env = os.environ | {"RABO_BENCH_SOURCE": str(tree)}
                subprocess.run([sys.executable, __file__, "--compute-worker", json.dumps(spec)], check=True, env=env)
                results[label][what].append(json.loads(out.read_text()))
                print(f"  {what} ({label}): " + json.dumps({k: v for k, v in results[label][what][-1].items()
                                                            if k not in ("records", "iterations", "clients")}), flush=True)
    summary = {label: compute_rows(r) for label, r in results.items()}
    if before:
        for what in {"rabo", "fedmbo"} & set(results["after"]):
            summary["after"][f"{what}_records_identical"] = all(
                b["records"] == a["records"] for b, a in zip(results["before"][what], results["after"][what]))
        by_round = {label: [compute_rows({k: [v[i]] for k, v in r.items()}) for i in range(c["rounds"])]
                    for label, r in results.items()}
        summary["after"]["before_over_after_by_round"] = {
            key: [b[key] / a[key] for b, a in zip(by_round["before"], by_round["after"])]
            for key in ("evaluation_s", "evaluation_cpu_s", "rabo_iteration_s", "fedmbo_iteration_s",
                        "rabo_iteration_cpu_s", "fedmbo_iteration_cpu_s", "outer_capacity_1/16_cpu_s")
            if key in by_round["before"][0] and key in by_round["after"][0]}
        for key in ("rabo_over_fedmbo", "rabo_over_fedmbo_cpu", "outer_1/16_over_1", "outer_1/16_over_1_cpu"):
            for label in trees:
                if key in by_round[label][0]:
                    summary[label][f"{key}_by_round"] = [r[key] for r in by_round[label]]
        summary["by_round"] = by_round
    for r in results.values():
        for what in ("rabo", "fedmbo"):
            for run in r[what]:
                run.pop("records")
    return {"scenarios": str(TABLE2.relative_to(REPO)), "overrides": CPU_SCALE, "settings": c, "threads": threads,
            "summary": summary, "raw": results}


def compute_rows(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of the compute table from one tree's measurements: medians over rounds."""
    evaluations, rabo, fedmbo = r.get("evaluation", []), r.get("rabo", []), r.get("fedmbo", [])

    def median(runs, *path):
        values = []
        for run in runs:
            for key in path:
                run = run[key]
            values.append(run)
        return statistics.median(values)

    rows = {}
    if evaluations:
        rows |= {"evaluation_s": median(evaluations, "time_s"), "evaluation_cpu_s": median(evaluations, "cpu_s"),
                 "test_accuracy": evaluations[0]["test_accuracy"], "test_accuracy_se": evaluations[0]["test_accuracy_se"]}
    if rabo and fedmbo:  # --compute-jobs may leave them out
        rows |= {"rabo_iteration_s": median(rabo, "median_s"), "fedmbo_iteration_s": median(fedmbo, "median_s")}
        rows["rabo_over_fedmbo"] = statistics.median(a["median_s"] / b["median_s"] for a, b in zip(rabo, fedmbo))
        cpu = all("median_cpu_s" in run for run in [*rabo, *fedmbo])  # measured since speed3 (CPU time beside wall time)
        if cpu:
            rows |= {"rabo_iteration_cpu_s": median(rabo, "median_cpu_s"), "fedmbo_iteration_cpu_s": median(fedmbo, "median_cpu_s")}
            rows["rabo_over_fedmbo_cpu"] = statistics.median(a["median_cpu_s"] / b["median_cpu_s"] for a, b in zip(rabo, fedmbo))
        for phase in ("outer", "inner"):
            for capacity, label in (("1", "1"), ("0.0625", "1/16")):
                rows[f"{phase}_capacity_{label}_s"] = median(rabo, "clients", f"{phase} {capacity}", "median_s")
                rows[f"{phase}_capacity_{label}_flops"] = median(rabo, "clients", f"{phase} {capacity}", "flops")
                if cpu:
                    rows[f"{phase}_capacity_{label}_cpu_s"] = median(rabo, "clients", f"{phase} {capacity}", "median_cpu_s")
        rows["outer_1/16_over_1"] = statistics.median(run["clients"]["outer 0.0625"]["median_s"] / run["clients"]["outer 1"]["median_s"]
                                                      for run in rabo)
        if cpu:
            rows["outer_1/16_over_1_cpu"] = statistics.median(
                run["clients"]["outer 0.0625"]["median_cpu_s"] / run["clients"]["outer 1"]["median_cpu_s"] for run in rabo)
    rows["loadavg"] = [run["loadavg"] for run in [*evaluations, *rabo, *fedmbo]]
    rows["loadavg_start"] = [run.get("loadavg_start") for run in [*evaluations, *rabo, *fedmbo]]
    return rows


# ---------------------------------------------------------------- part 8: max-pooling


POOL_WIDTHS = (4, 8, 16, 32, 64)  # Conv4 at capacities 1/16 to 1 (a client's slices have these widths)


def _pool_inputs(task, x, images) -> list[torch.Tensor]:
    """What each of the backbone's four poolings reads on ``images`` (real activations: ReLU's zeros,
    the blank background's equal values; the plain kernel branches less on them than on noise)."""
    from rabo_flwr.models import units

    seen, hooks = [], [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
                       for m in task.backbone.module.modules() if isinstance(m, units.MaxPool2)]
    try:
        with torch.no_grad():
            task.features(x, images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def pooling_benchmark(cfg: dict[str, Any]) -> dict[str, Any]:
    """Max-pooling on a Table II client at CPU scale (Conv4 of each capacity's width, a real Omniglot
    episode: 5 support and 95 query images), in thread CPU time, the routes alternating per repetition:

    - per pooling call, on the activations it really reads: forward, backward (``create_graph``, as
      the hypergradient takes it) and double backward, median ms (the routes in a shuffled order:
      a large call's time depends on what the one before freed), for ``plain`` (``F.max_pool2d``),
      ``channels_last`` (forced, whatever the size) and ``max_pool2`` (the route the models take),
      each route's results checked bit for bit against the plain call's;
    - the pooling's share of a client's outer-phase computation (the query loss's value without
      gradient, then the exact hypergradient: query gradient, conjugate gradient, mixed product),
      with the plain route and with max_pool2, median ms."""
    from rabo_flwr.models import units

    threshold = units.CHANNELS_LAST_POOL_MIN

    def with_threshold(value, work):
        units.CHANNELS_LAST_POOL_MIN = value
        try:
            return work()
        finally:
            units.CHANNELS_LAST_POOL_MIN = threshold

    routes = {"plain": lambda a: torch.nn.functional.max_pool2d(a, 2),
              "channels_last": lambda a: with_threshold(0, lambda: units.max_pool2(a)), "max_pool2": units.max_pool2}

    def once(pool, a, seed, v):
        a, seed = a.detach().requires_grad_(True), seed.detach().requires_grad_(True)
        t0 = time.thread_time()
        out = pool(a)
        t1 = time.thread_time()
        (ga,) = torch.autograd.grad(out, a, seed, create_graph=True)
        t2 = time.thread_time()
        (gs,) = torch.autograd.grad(ga, seed, v)
        t3 = time.thread_time()
        return (t1 - t0, t2 - t1, t3 - t2), (out.detach(), ga.detach(), gs)

    repeats, gen, order = cfg["pooling"]["repeats"], torch.Generator().manual_seed(0), random.Random(0)
    rows, phases = [], []
    for width in POOL_WIDTHS:
        scenario = load_scenario(TABLE2 / "rabo.yaml", CPU_SCALE | {"model.width": width})
        task = cached_task(scenario)
        x, y = task.init_tensors(scenario.seed)
        y = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in y.items()}
        batch = task.client_batch(0, 2, CPU, 1)
        for images, label in ((batch.lower[0], "support"), (batch.upper[0], "query")):
            for a in _pool_inputs(task, x, images):
                seed = torch.randn(*a.shape[:2], a.shape[2] // 2, a.shape[3] // 2, generator=gen)
                v = torch.randn(a.shape, generator=gen)
                times: dict[str, list] = {name: [] for name in routes}
                identical = True
                for _ in range(repeats):
                    results = {}
                    for name in order.sample(list(routes), len(routes)):  # no route always after another
                        t, results[name] = once(routes[name], a, seed, v)
                        times[name].append(t)
                    identical &= all(torch.equal(p, q) for name in routes for p, q in zip(results[name], results["plain"]))
                row = {"width": width, "set": label, "shape": list(a.shape), "elements": a.numel(),
                       "zeros": float((a == 0).float().mean()), "identical": identical,
                       "route": "channels_last" if a.numel() >= threshold else "plain"}
                for name, ts in times.items():
                    parts = [1e3 * statistics.median(t[i] for t in ts) for i in range(3)]
                    row[name] = {"forward_ms": parts[0], "backward_ms": parts[1], "double_backward_ms": parts[2],
                                 "total_ms": sum(parts)}
                rows.append(row)
                print(f"  width {width} {label} {tuple(a.shape)}: " + ", ".join(
                    f"{name} {row[name]['total_ms']:.3f} ms" for name in routes), flush=True)
        xs, ys, xn, yn = list(x.values()), list(y.values()), list(x), list(y)

        def upper(a, b):
            return task.upper_loss(dict(zip(xn, a)), dict(zip(yn, b)), batch.upper)

        def lower(a, b):
            return task.lower_loss(dict(zip(xn, a)), dict(zip(yn, b)), batch.lower)

        def phase():
            with torch.no_grad():
                upper(xs, ys)
            return hypergradient_with_stats(upper, lower, xs, ys, "exact")[0]

        times = {"plain": [], "max_pool2": []}
        results = {}
        for _ in range(max(5, repeats // 2)):
            for name, value in order.sample([("plain", math.inf), ("max_pool2", threshold)], 2):
                start = time.thread_time()
                results[name] = with_threshold(value, phase)
                times[name].append(time.thread_time() - start)
        phases.append({"width": width, **{f"{name}_ms": 1e3 * statistics.median(ts[1:]) for name, ts in times.items()},
                       "identical": all(torch.equal(p, q) for p, q in zip(results["plain"], results["max_pool2"]))})
        print(f"  width {width} outer-phase computation: " + json.dumps(phases[-1]), flush=True)
    return {"threshold": threshold, "repeats": repeats, "torch": torch.__version__, "rows": rows, "phases": phases}


# ---------------------------------------------------------------- output


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (printed, and pasted into benchmarks/README.md)."""
    def fmt(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report(results: dict[str, Any]) -> str:
    parts = []
    if "pooling" in results:
        po = results["pooling"]
        parts.append(table(f"Max-pooling 2x2 on a client's real activations: forward + backward (create_graph) + "
                           f"double backward, thread CPU time (ms, median of {po['repeats']}); max_pool2 takes the "
                           f"channels-last route from {po['threshold']} elements",
                           ["width", "set", "input", "zeros", "plain", "channels-last", "max_pool2",
                            "plain / max_pool2", "identical"],
                           [[r["width"], r["set"], "x".join(map(str, r["shape"])), r["zeros"], r["plain"]["total_ms"],
                             r["channels_last"]["total_ms"], r["max_pool2"]["total_ms"],
                             r["plain"]["total_ms"] / r["max_pool2"]["total_ms"], r["identical"]] for r in po["rows"]]))
        parts.append(table("A client's outer-phase computation (query value, exact hypergradient), thread CPU time "
                           "(ms, median)", ["width", "plain pooling", "max_pool2", "plain / max_pool2", "identical"],
                           [[p["width"], p["plain_ms"], p["max_pool2_ms"], p["plain_ms"] / p["max_pool2_ms"],
                             p["identical"]] for p in po["phases"]]))
    if "flower_overhead" in results:
        fo = results["flower_overhead"]
        f = fo["flower"]
        rows = [["Flower simulation (2 actors x 1 thread)", f["median_s"], f["median_inner_s"], f["median_outer_s"],
                 f["median_clients_compute_s"], f["first_s"], 1.0]]
        rows += [[f"plain engine, sequential, {k.split('_')[0]} torch thread(s)", p["median_s"], p["median_inner_s"],
                  p["median_outer_s"], p["median_clients_compute_s"], p["first_s"], p["flower_over_plain"]]
                 for k, p in fo["plain"].items()]
        u = fo["flops_not_counted"]
        rows.append(["plain engine, 1 thread, FLOPs not counted", u["median_s"], u["median_inner_s"], u["median_outer_s"],
                     u["median_clients_compute_s"], u["first_s"], f["median_s"] / u["median_s"]])
        parts.append(table("Flower overhead: time per global iteration (s, median)",
                           ["engine", "iteration", "inner", "outer", "clients' compute (sum)", "iteration 1",
                            "Flower / this"], rows))
        if "flower_one_actor" in fo:
            o = fo["flower_one_actor"]
            parts.append(table("Flower at the same parallelism: one client at a time, one thread (s, median)",
                               ["engine", "iteration", "inner", "outer", "clients' compute (sum)", "iteration 1",
                                "Flower / plain"],
                               [["Flower simulation, 1 actor x 1 thread", o["median_s"], o["median_inner_s"],
                                 o["median_outer_s"], o["median_clients_compute_s"], o["first_s"], o["flower_over_plain"]],
                                ["plain engine, sequential, 1 thread (run before)", o["plain_before_s"], None, None, None,
                                 None, None],
                                ["plain engine, sequential, 1 thread (run after)", o["plain_after_s"], None, None, None,
                                 None, None]]))
        parts.append(f"Counting FLOPs (cached, the default) against not counting: "
                     f"{u['counted_over_uncounted']:.3g} times the time per iteration.\n")
        parts.append(table("Flower start-up (s)", ["flwr run wall", "iterations", "evaluation",
                                                   "start-up + shutdown (rest)", "iteration-1 excess"],
                           [[f["flwr_run_s"], f["total_s"], f["eval_s"], f["startup_s"], f["first_iteration_excess_s"]]]))
    if "hypergradients" in results:
        rows = [[r["task"], r["estimator"], r["time_s"], r["grad_evals"], r["hvp_evals"], r["peak_mib"],
                 r["vs_exact"]["cosine"], r["grad_x_f_only_vs_exact"]["cosine"], r["vs_exact"]["rel_error"],
                 r.get("vs_own_target", {}).get("cosine"), r.get("fd_on_sampled", {}).get("rel_error"),
                 r.get("negative_curvature"), r.get("iterations")]
                for r in results["hypergradients"]]
        parts.append(table("Hypergradient estimators (one client, full model)",
                           ["task", "estimator", "time (s)", "grad evals", "hvp evals", "peak mem (MiB)",
                            "cos vs exact", "cos of grad_x f alone vs exact", "rel err vs exact",
                            "cos vs own target", "FD rel err on sampled coords", "negative curvature",
                            "iterations"], rows))
    if "scaling" in results:
        for key, label in (("clients", "clients"), ("capacity", "capacity (all clients)")):
            rows = [[r[key], r["median_s"], r["median_inner_s"], r["median_outer_s"],
                     r["median_s"] / r["clients"]] for r in results["scaling"][key]]
            parts.append(table(f"Plain engine: time per iteration vs {label} (s, median)",
                               [label, "iteration", "inner", "outer", "per client"], rows))
    if "scale" in results:
        rows = [[r["clients"], r["fraction"], r.get("median_s"), r.get("median_inner_s"), r.get("median_outer_s"),
                 r.get("server_peak_rss_mib"), r.get("error", "")[-120:].replace("\n", " ") or None]
                for r in results["scale"]["flower"]]
        parts.append(table("flwr run, 10 clients sampled per iteration (s, median; MiB)",
                           ["clients", "fraction", "iteration", "inner", "outer", "server peak RSS (MiB)", "error"],
                           rows))
        rows = [[r["clients"], r["fraction"], r.get("median_s"), r.get("loop_peak_traced_mib"),
                 r.get("error", "")[-120:].replace("\n", " ") or None] for r in results["scale"]["plain"]]
        parts.append(table("Plain engine, 10 clients sampled per iteration (s, median; MiB)",
                           ["clients", "fraction", "iteration", "loop's peak Python memory (MiB)", "error"], rows))
    if "deployment" in results:
        d = results["deployment"]
        parts.append(table("Edge trial: 3 SuperNodes, every message a fresh ClientApp process (s)",
                           ["flwr run wall", "median phase", "phases", "slowest client's compute per phase"],
                           [[d["run"]["flwr_run_s"], d["run"]["median_phase_s"],
                             " ".join(f"{t:.1f}" for t in d["run"]["phase_s"]),
                             " ".join(f"{t:.2f}" for t in d["run"]["phase_clients_max_s"])]]))
        keys = ["interpreter_and_exit_s", "flwr_import_s", "torch_import_s", "app_import_s", "handle_s",
                "client_run_s", "process_s"]
        parts.append(table("One message in a fresh process, by stage (s)",
                           ["phase", "repeat", "interpreter + exit", "flwr import", "torch import",
                            "project import", "handler", "of which client.run", "whole process"],
                           [[m["phase"], m["repeat"], *[m.get(k) for k in keys]] for m in d["messages"]]))
    if "parallel" in results:
        par = results["parallel"]
        runs = [(f"round {i + 1}: {label}", r[key]) for i, r in enumerate(par["rounds"])
                for key, label in (("sequential", "one after another, 1 torch thread"),
                                   ("workers", "run.workers 2, 1 torch thread each"))]
        rows = [[label, r["median_s"], r["median_inner_s"], r["median_outer_s"], r["median_clients_compute_s"],
                 r["first_s"], r["run_s"]] for label, r in runs]
        parts.append(table("Plain engine, 10 clients: one after another or 2 worker processes (s per iteration, median)",
                           ["engine", "iteration", "inner", "outer", "clients' compute (sum)", "iteration 1",
                            "whole run"], rows))
        ratios = ", ".join(f"{r['sequential_over_workers']:.3g}" for r in par["rounds"])
        parts.append(f"One after another (1 thread) / 2 workers, per round: {ratios} (median {par['median_ratio']:.3g}).\n")
    if "compute" in results:
        summary = results["compute"]["summary"]
        labels = [label for label in ("before", "after") if label in summary]
        keys = [("evaluation_s", "one evaluation, test episodes 5w1s (s)"),
                ("evaluation_cpu_s", "its CPU time (s)"),
                ("test_accuracy", "its test accuracy (x_0)"),
                ("rabo_iteration_s", "RABO phase time per iteration (s)"),
                ("rabo_iteration_cpu_s", "its CPU time (s)"),
                ("fedmbo_iteration_s", "FedMBO phase time per iteration (s)"),
                ("fedmbo_iteration_cpu_s", "its CPU time (s)"),
                ("rabo_over_fedmbo", "RABO / FedMBO"),
                ("rabo_over_fedmbo_cpu", "RABO / FedMBO, CPU time"),
                ("outer_capacity_1_s", "outer phase, one client at capacity 1 (s)"),
                ("outer_capacity_1_cpu_s", "its CPU time (s)"),
                ("outer_capacity_1_flops", "its FLOPs"),
                ("outer_capacity_1/16_s", "outer phase, one client at capacity 1/16 (s)"),
                ("outer_capacity_1/16_cpu_s", "its CPU time (s)"),
                ("outer_capacity_1/16_flops", "its FLOPs"),
                ("outer_1/16_over_1", "outer phase time, capacity 1/16 / capacity 1"),
                ("outer_1/16_over_1_cpu", "the same in CPU time"),
                ("inner_capacity_1_s", "inner phase, one client at capacity 1 (s)"),
                ("inner_capacity_1/16_s", "inner phase, one client at capacity 1/16 (s)")]
        keys = [(k, label) for k, label in keys if any(k in summary[t] for t in labels)]
        rows = [[label, *(summary[t].get(k) for t in labels)] for k, label in keys]
        if len(labels) == 2:
            for row, (k, _) in zip(rows, keys):
                b, a = summary["before"].get(k), summary["after"].get(k)
                row.append(b / a if k.endswith("_s") and a and b else None)
        parts.append(table(f"Compute (Table II 5w1s at CPU scale, plain engine, {results['compute']['threads']} "
                           "torch thread(s), medians over rounds)", ["what", *labels] + (["before / after"] if len(labels) == 2 else []),
                           rows))
        after = summary["after"]
        if "before_over_after_by_round" in after:
            for key, ratios in after["before_over_after_by_round"].items():
                parts.append(f"{key}, before / after within each round: " + ", ".join(f"{v:.3g}" for v in ratios) + "\n")
            for label in labels:
                for key in ("rabo_over_fedmbo", "rabo_over_fedmbo_cpu", "outer_1/16_over_1", "outer_1/16_over_1_cpu"):
                    if f"{key}_by_round" in summary[label]:
                        parts.append(f"{label}: {key} by round: "
                                     + ", ".join(f"{v:.3g}" for v in summary[label][f"{key}_by_round"]) + "\n")
            for what in ("rabo", "fedmbo"):
                if f"{what}_records_identical" not in after:  # --compute-jobs left it out
                    continue
                parts.append(f"{what}: records other than timings identical before and after: "
                             f"{after[f'{what}_records_identical']}\n")
        parts.append("Load average (1, 5, 15 min) at the end of each measurement: " + "; ".join(
            f"{label}: " + ", ".join("/".join(f"{v:.1f}" for v in la) for la in summary[label]["loadavg"])
            for label in ("before", "after") if label in summary) + "\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run (< 2 min)")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results.json, "
                        "benchmarks/results-quick.json with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process (default 1)")
    parser.add_argument("--parts", default="flower,hypergradients,scaling,scale,deployment,parallel",
                        help="comma-separated subset of these, compute and pooling")
    parser.add_argument("--before", type=Path, help="compute part: also measure this checkout, alternately")
    parser.add_argument("--compute-jobs", help="compute part: a comma-separated subset of evaluation,rabo,fedmbo "
                        "(default all three)")
    parser.add_argument("--rounds", type=int, help="compute part: rounds (default 3, 1 with --quick)")
    parser.add_argument("--hypergradient-worker", help=argparse.SUPPRESS)
    parser.add_argument("--compute-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out or REPO / "benchmarks" / ("results-quick.json" if args.quick else "results.json")
    if args.hypergradient_worker:
        return hypergradient_worker(json.loads(args.hypergradient_worker))
    if args.compute_worker:
        return compute_worker(json.loads(args.compute_worker))
    if "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION" not in os.environ:
        sys.exit("source ./offline.env first (the offline Flower variables)")
    torch.set_num_threads(args.threads)
    cfg = settings(args.quick)
    parts = args.parts.split(",")
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "threads": args.threads,
                               "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                               "settings": cfg}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rabo-bench-") as tmp:
        if "flower" in parts:
            print("part 1: Flower overhead", flush=True)
            results["flower_overhead"] = flower_overhead(cfg, args.threads, Path(tmp))
        if "hypergradients" in parts:
            print("part 2: hypergradient estimators", flush=True)
            results["hypergradients"] = hypergradient_benchmark(cfg, args.threads, Path(tmp))
        if "scaling" in parts:
            print("part 3: clients and capacity", flush=True)
            results["scaling"] = scaling(cfg, args.threads, Path(tmp))
        if "scale" in parts:
            print("part 4: many clients", flush=True)
            results["scale"] = scale(cfg, args.threads, Path(tmp))
            scale_figure(results["scale"], args.out.with_name(args.out.stem + "-scale.png"))
        if "deployment" in parts:
            print("part 5: edge deployment", flush=True)
            results["deployment"] = deployment(cfg, args.threads, Path(tmp))
        if "parallel" in parts:
            print("part 6: both cores in one run", flush=True)
            results["parallel"] = parallel(cfg, Path(tmp))
            torch.set_num_threads(args.threads)
        if "pooling" in parts:
            print("part 8: max-pooling", flush=True)
            results["pooling"] = pooling_benchmark(cfg)
        if "compute" in parts:
            print("part 7: compute", flush=True)
            if args.rounds:
                cfg["compute"]["rounds"] = args.rounds
            results["compute"] = compute_benchmark(cfg, args.threads, args.before, Path(tmp),
                                                   args.compute_jobs.split(",") if args.compute_jobs else None)
    results["bench_wall_s"] = time.perf_counter() - started
    print()
    print(report(results))
    print(f"total {results['bench_wall_s']:.0f} s; machine: {results['machine']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from rabo_flwr.results import to_json  # here, not above: a compute worker imports an older tree, which may lack it

    args.out.write_text(to_json(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
