"""The paper's experiments, one command per set: run every cell, then write CSV, Markdown and plots.

    python -m rabo_flwr.experiments table2 --column 5w1s          # Table II, one column, every row
    python -m rabo_flwr.experiments cx-star                       # the C_x* study (Fig. 3)
    python -m rabo_flwr.experiments loss-tuning                   # the loss-tuning rows (Fig. 5)

A cell is a scenario file under ``scenarios/paper/`` plus overrides (the column, the scale).
``--scale cpu`` (default) applies :data:`SCALES` ``["cpu"]``: a Conv4 backbone instead of
ResNet12, a small CNN instead of ResNet18, and early stopping; ``--scale paper`` runs the files
as they are (a GPU's work). Every output is labelled with its scale. Cells run in parallel
processes (``--jobs``, one torch thread each when more than one), through the plain engine
(the same loop and client code as Flower's, without it) or ``--engine flower`` (``flwr run``).
A cell whose results directory already holds a finished run of the same scenario is not run
again, so an interrupted set resumes and ``--plot-only`` redraws from what is there.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import read_metrics  # noqa: E402
from .scenario import APP_DIR, Scenario, load_scenario  # noqa: E402

PAPER = APP_DIR / "scenarios" / "paper"

# Table II: rows in the paper's order, columns as task overrides; the paper's accuracies.
TABLE2_ROWS = ["dist-protonet", "dist-maml", "fedmbo", "static", "oap", "fedrolex", "fiarse", "rabo", "rafbo"]
COLUMNS = {"5w1s": {"task.n_way": 5, "task.k_shot": 1}, "5w5s": {"task.n_way": 5, "task.k_shot": 5},
           "20w1s": {"task.n_way": 20, "task.k_shot": 1}, "20w5s": {"task.n_way": 20, "task.k_shot": 5}}
PAPER_TABLE2 = {  # arXiv 2512.24667, Table II (ResNet12, 10 clients)
    "dist-protonet": (80.76, 89.33, 60.05, 78.01), "dist-maml": (81.46, 92.01, 61.36, 78.35),
    "fedmbo": (82.66, 93.69, 63.18, 81.64), "static": (72.34, 85.09, 42.99, 51.01), "oap": (73.58, 86.16, 45.45, 51.92),
    "fedrolex": (73.74, 86.95, 47.25, 55.29), "fiarse": (74.33, 87.78, 49.52, 55.87), "rabo": (76.05, 89.12, 54.97, 77.41),
    "rafbo": (75.09, 88.57, 51.37, 71.16)}
PAPER_COST = {"rabo": 0.267, "rafbo": 0.178}  # FLOPs relative to FedMBO (Fig. 4); bytes: 0.267 for both
LOSS_TUNING_ROWS = ["ce", "vs-fixed", "fedmbo", "rabo", "rafbo", "rabo-vs-objective"]

# What each scale changes, per task. "paper" runs the scenario files unchanged.
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "fewshot": {"model.backbone": "conv4", "model.width": 64, "algorithm.iterations": 800,
                    "run.eval_every": 40, "run.patience": 3, "run.min_delta": 0.005},
        "loss-tuning": {"model.backbone": "conv4", "model.width": 32, "algorithm.iterations": 200,
                        "run.eval_every": 20},
    },
    "paper": {"fewshot": {}, "loss-tuning": {}},
}


# Step-size sweep: every family gets the same grid and budget (100 iterations), judged on 200
# evaluation episodes drawn with another seed than the test episodes of the tables.
SWEEP = {
    "rabo": [{"algorithm.alpha": a} for a in (0.03, 0.1, 0.3, 1.0)],
    "fedrolex": [{"algorithm.alpha": lr, "algorithm.beta": lr} for lr in (0.03, 0.1, 0.3, 1.0)]
                + [{"algorithm.alpha": 0.1, "algorithm.beta": 0.1, "task.labels": "episode"}],  # why labels are global
    "dist-protonet": [{"algorithm.alpha": lr} for lr in (0.03, 0.1, 0.3, 1.0)],
    "dist-maml": [{"algorithm.alpha": lr, "algorithm.beta": lr} for lr in (0.03, 0.1, 0.3, 1.0)],
}
SWEEP_BUDGET = {"algorithm.iterations": 100, "run.eval_every": 50, "task.eval_episodes": 200, "task.eval_seed": 1,
                "run.patience": 0}


@dataclass
class Cell:
    """One run: a scenario file, the overrides that make it this cell, and where its results go."""

    label: str
    path: Path
    overrides: dict[str, Any]

    def scenario(self) -> Scenario:
        return load_scenario(self.path, self.overrides)


def cells_for(name: str, column: str, rows: list[str] | None, scale: str, out: Path,
              extra_overrides: dict[str, Any] | None = None) -> list[Cell]:
    """The cells of a set, every scenario validated before anything runs."""
    def sweep_label(row: str, point: dict[str, Any]) -> str:
        return f"{row}-{'-'.join(str(v) for v in point.values())}"

    if name == "table2":
        specs = [(row, PAPER / "table2" / f"{row}.yaml", COLUMNS[column]) for row in rows or TABLE2_ROWS]
    elif name == "cx-star":
        specs = [(f"{a}-c{c}", PAPER / "cx_star" / f"{a}_c{c}.yaml", {}) for a in ("rabo", "rafbo") for c in (1, 2)
                 if not rows or f"{a}-c{c}" in rows]
    elif name == "loss-tuning":
        specs = [(row, PAPER / "losstuning" / f"{row}.yaml", {}) for row in rows or LOSS_TUNING_ROWS]
    elif name == "scalability":  # the paper's Table III; 30 background alphabets, so 50 clients shard by character
        specs = [(f"{row}-{n}", PAPER / "table2" / f"{row}.yaml",
                  COLUMNS[column] | {"clients.num": n, "task.shard_by": "character" if n > 30 else "alphabet"})
                 for row in rows or ("rabo", "rafbo") for n in (10, 20, 30, 50)]
    elif name == "lr-sweep":
        specs = [(sweep_label(row, point), PAPER / "table2" / f"{row}.yaml", COLUMNS[column] | SWEEP_BUDGET | point)
                 for row in rows or SWEEP for point in SWEEP[row]]
    else:
        raise ValueError(f"unknown set {name!r}")
    cells = [Cell(label, path, SCALES[scale][load_scenario(path).task.name] | extra | (extra_overrides or {})
                  | {"run.results_dir": str(out / "runs" / label)}) for label, path, extra in specs]
    for cell in cells:
        cell.scenario()  # a bad file or override stops the set here, before any cell runs
    return cells


def finished(scenario: Scenario) -> bool:
    """The results directory holds a completed run of exactly this scenario."""
    directory = scenario.results_path
    try:
        import yaml

        same = yaml.safe_load((directory / "scenario.yaml").read_text()) == scenario.to_dict()
        return same and read_metrics(directory / "metrics.jsonl")[-1]["phase"] == "done"
    except (OSError, ValueError, IndexError, KeyError):
        return False


def run_cell(cell: Cell, engine: str, threads: int) -> str:
    """Run one cell (in a worker process); its log goes to ``run.log`` in its results directory."""
    import torch

    torch.set_num_threads(threads)
    scenario = cell.scenario()
    if finished(scenario):
        return f"{cell.label}: already finished in {scenario.results_path}"
    scenario.results_path.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"rabo_flwr.experiments.{cell.label}")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(scenario.results_path / "run.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    if engine == "plain":
        from .loop import run_plain

        run_plain(scenario, logger)
        return f"{cell.label}: done"
    from .flower_run import FlowerHome, RunFailed

    with FlowerHome(scenario.results_path / "_flower", {"OMP_NUM_THREADS": str(threads)}) as home:
        outcome = home.run(APP_DIR, run_config={"scenario": str(cell.path), **cell.overrides},
                           federation_config={"num-supernodes": scenario.clients.num, "client-resources-num-cpus": 1})
    (scenario.results_path / "run.log").write_text(outcome.log)
    if outcome.status != "finished:completed":
        raise RunFailed(f"{cell.label}: run ended {outcome.status}\n{outcome.log[-4000:]}")
    return f"{cell.label}: done"


def run_cells(cells: list[Cell], engine: str, jobs: int, threads: int) -> None:
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for message in pool.map(run_cell, cells, [engine] * len(cells), [threads] * len(cells)):
            print(message, flush=True)


# ---------------------------------------------------------------------------- summaries


def summarize(cell: Cell, scale: str) -> dict[str, Any] | None:
    """One row of a set's table from a cell's metrics.jsonl and the scenario the run saved beside it.

    A run that ended without its ``done`` record (the process was stopped) is summarised up to its
    last evaluation and marked interrupted; None when there is no evaluation after iteration 0."""
    directory = cell.scenario().results_path
    try:
        scenario = load_scenario(directory / "scenario.yaml")
        records = read_metrics(directory / "metrics.jsonl")
    except (OSError, ValueError):
        return None
    evals = [r for r in records if r["phase"] == "eval"]
    if len(evals) < 2:
        return None
    done = records[-1] if records[-1]["phase"] == "done" else None
    last = done["iteration"] if done else evals[-1]["iteration"]
    phases = [r for r in records if r["phase"] not in ("eval", "done") and r["iteration"] <= last]
    status = ("stopped early" if done["stopped_early"] else "budget") if done else "interrupted"
    key = "test_accuracy" if scenario.task.name == "fewshot" else "balanced_accuracy"
    best = max(evals, key=lambda r: r[key])
    row = {
        "cell": cell.label, "scale": scale, "task": scenario.task.name, "algorithm": scenario.algorithm.name,
        "estimator": scenario.algorithm.resolved_estimator, "backbone": scenario.model.backbone,
        "clients": scenario.clients.num, "iterations_run": last, "status": status,
        "metric": key, "start": evals[0][key], "final": evals[-1][key], "final_se": evals[-1].get(f"{key}_se", math.nan),
        "best": best[key], "best_iteration": best["iteration"],
        "C_x*": phases[-1].get("C_x*", 0),  # the run's, over all elements (0 if one was never trained)
        "trained_x": phases[-1]["trained_x"], "trained_y": phases[-1]["trained_y"],
        "flops": sum(r["flops"] for r in phases), "wasted_flops": sum(r["wasted_flops"] for r in phases),
        "uncounted_replies": sum(r.get("uncounted_replies", 0) for r in phases),
        "x_elements_by_capacity": x_elements_by_capacity(phases),
        "bytes": sum(r["bytes_down"] + r["bytes_up"] for r in phases),
        "wasted_bytes": sum(r["wasted_bytes"] for r in phases),
        "rejected": sum(r["rejected"] for r in phases), "failures": sum(r["failures"] for r in phases),
        "negative_curvature_replies": sum(r["negative_curvature_clients"] for r in phases),
        "flops_per_iteration": sum(r["flops"] for r in phases) / max(1, last),
        "wall_time": sum(r["wall_time"] for r in phases) + sum(r.get("eval_time", 0.0) for r in evals),
        "overrides": {k: v for k, v in cell.overrides.items() if k != "run.results_dir"}
                     | {"algorithm.iterations": scenario.algorithm.iterations},
        "curve": [(r["iteration"], r[key], r.get(f"{key}_se", 0.0)) for r in evals],
    }
    if scenario.task.name == "loss-tuning":
        final = evals[-1]
        row |= {"head_accuracy": final["head_accuracy"], "tail_accuracy": final["tail_accuracy"],
                "per_class_accuracy": final["per_class_accuracy"], "w": final["w"], "l": final["l"], "Delta": final["Delta"]}
    return row


def x_elements_by_capacity(phases: list[dict[str, Any]]) -> dict[float, float]:
    """Mean size of the x-submodel the clients of each capacity held (phases that sent x), for the tables."""
    sizes: dict[float, list[int]] = {}
    for record in phases:
        for client in record["clients"]:
            if client["x_elements"]:
                sizes.setdefault(client["capacity"], []).append(client["x_elements"])
    return {capacity: sum(v) / len(v) for capacity, v in sorted(sizes.items(), reverse=True)}


def add_cost_ratios(rows: list[dict[str, Any]]) -> None:
    """FLOPs and bytes relative to FedMBO's on the same task: per iteration (the paper's Figs. 4 and 6)
    and in total to the end of the run (rows stop at different iterations)."""
    fedmbo = {r["task"]: r for r in rows if r["algorithm"] == "fedmbo"}
    for row in rows:
        ref = fedmbo.get(row["task"])
        per = lambda r, k: r[k] / max(1, r["iterations_run"])  # noqa: E731
        row["flops_vs_fedmbo"] = per(row, "flops") / per(ref, "flops") if ref and ref["flops"] > 0 else math.nan
        row["bytes_vs_fedmbo"] = per(row, "bytes") / per(ref, "bytes") if ref and ref["bytes"] else math.nan
        row["total_flops_vs_fedmbo"] = row["flops"] / ref["flops"] if ref and ref["flops"] > 0 else math.nan


def _pct(value: float, se: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{100 * value:.2f}%" + (f" ± {100 * se:.2f}" if se and not math.isnan(se) else "")


def _ratio(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.3f}"


def write_outputs(name: str, rows: list[dict[str, Any]], out: Path, title: str, paper_column: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    with open(out / f"{name}_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "iteration", rows[0]["metric"], "se"])
        for r in rows:
            writer.writerows([r["cell"], *point] for point in r["curve"])
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    _plot_curves(name, rows, out, title)
    if any(r["algorithm"] == "fedmbo" for r in rows):
        _plot_cost(name, rows, out, title)
    if rows[0]["task"] == "loss-tuning":
        _plot_hyperparameters(name, rows, out, title)
    _write_markdown(name, rows, out, title, paper_column)


def _plot_curves(name, rows, out, title):
    """Accuracy against global iterations (the paper's Fig. 2) and against FLOPs spent (cost-matched)."""
    colors = plt.cm.tab20.colors if len(rows) > 10 else plt.cm.tab10.colors
    for suffix, xlabel, scale_x in (("accuracy", "global iteration", lambda r, its: its),
                                    ("accuracy_vs_flops", "FLOPs spent (all clients, all work sent; log scale)",
                                     lambda r, its: [q * r["flops_per_iteration"] for q in its])):
        if suffix == "accuracy_vs_flops" and any(r["flops_per_iteration"] <= 0 for r in rows):
            continue  # FLOPs were not counted
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, r in enumerate(rows):
            # on the log-scaled FLOPs axis there is no iteration 0
            its, acc, se = zip(*[point for point in r["curve"] if suffix == "accuracy" or point[0] > 0])
            xs = scale_x(r, its)
            line, = ax.plot(xs, [100 * a for a in acc], label=r["cell"], lw=1.4, color=colors[i % len(colors)])
            ax.fill_between(xs, [100 * (a - s) for a, s in zip(acc, se)], [100 * (a + s) for a, s in zip(acc, se)],
                            color=line.get_color(), alpha=0.15)
        if suffix == "accuracy_vs_flops":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{rows[0]['metric'].replace('_', ' ')} (%)")
        ax.set_title(f"{title} ({rows[0]['scale']} scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / f"{name}_{suffix}.png", dpi=120)
        plt.close(fig)


def _plot_cost(name, rows, out, title):
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["flops_vs_fedmbo"] for r in rows], width=0.4, label="FLOPs per iteration")
    ax.bar([x + 0.2 for x in xs], [r["bytes_vs_fedmbo"] for r in rows], width=0.4, label="bytes per iteration")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), [r["cell"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative to FedMBO")
    ax.set_title(f"{title}: cost ({rows[0]['scale']} scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}_cost.png", dpi=120)
    plt.close(fig)


def _plot_hyperparameters(name, rows, out, title):
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, key in zip(axes, ("w", "l", "Delta", "per_class_accuracy")):
        for r in rows:
            ax.plot(range(10), r[key], marker="o", ms=3, label=r["cell"])
        ax.set_title(key.replace("_", " ") + (" (final)" if key == "per_class_accuracy" else ""))
        ax.set_xlabel("class (0 = most frequent)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: learned VS-loss hyperparameters and per-class test accuracy ({rows[0]['scale']} scale)")
    fig.tight_layout()
    fig.savefig(out / f"{name}_hyperparameters.png", dpi=120)
    plt.close(fig)


def _write_markdown(name, rows, out, title, paper_column):
    metric = rows[0]["metric"].replace("_", " ")
    lines = [f"# {title} ({rows[0]['scale']} scale)", ""]
    budget = min(r["curve"][-1][0] for r in rows)  # the last iteration every row was evaluated at
    header = ["row", f"final {metric} ± SE", f"at iteration {budget}", "best (iteration)", "iterations run (end)", "C_x*",
              "FLOPs/it vs FedMBO", "bytes/it vs FedMBO", "wasted FLOPs", "rejected"]
    if paper_column is not None:
        header.insert(1, "paper")
    if rows[0]["task"] == "loss-tuning":
        header[4:4] = ["head classes (final)", "tail classes (final)"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        at_budget = next((a, se) for q, a, se in r["curve"] if q == budget)
        cells = [r["cell"], _pct(r["final"], r["final_se"]), _pct(*at_budget), f"{_pct(r['best'])} ({r['best_iteration']})",
                 f"{r['iterations_run']} ({r['status']})", str(r["C_x*"]),
                 _ratio(r.get("flops_vs_fedmbo", math.nan)), _ratio(r.get("bytes_vs_fedmbo", math.nan)),
                 f"{r['wasted_flops']:.3g}", str(r["rejected"])]
        if paper_column is not None:
            paper = PAPER_TABLE2.get(r["algorithm"])
            cells.insert(1, f"{paper[paper_column]:.2f}%" if paper and r["cell"] == r["algorithm"] else "")
        if r["task"] == "loss-tuning":
            cells[4:4] = [_pct(r["head_accuracy"]), _pct(r["tail_accuracy"])]
        lines.append("| " + " | ".join(cells) + " |")
    common = {k: v for k, v in rows[0]["overrides"].items() if all(r["overrides"].get(k) == v for r in rows)}
    lines += ["", f"Scale: {rows[0]['scale']}; overrides of every row's scenario file: `{json.dumps(common)}`.",
              "Final = the last evaluation: where early stopping stopped the row (`stopped early`), its iteration "
              "budget (`budget`), or where the session running it ended (`interrupted`, still a valid prefix of "
              f"the run); `at iteration {budget}` compares every row at the same budget. SE = standard error over "
              "the evaluation episodes. Cost ratios are per global iteration, over all work sent "
              "(rejected and failed replies included; `wasted FLOPs` is that part)."]
    if len({r["overrides"]["algorithm.iterations"] for r in rows}) > 1:
        lines.append("Iteration budgets differ between rows: " + ", ".join(
            f"{r['cell']} {r['overrides']['algorithm.iterations']}" for r in rows) + ".")
    if paper_column is not None:
        lines.append("Paper = Table II of arXiv 2512.24667 (ResNet12, full scale); paper cost ratios: RABO 0.267, "
                     "RAFBO 0.178 of FedMBO's FLOPs, 0.267 of its bytes.")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


SET_TITLES = {"table2": "Table II, {column}", "cx-star": "C_x* study, 5-way 5-shot",
              "loss-tuning": "Loss tuning, long-tail CIFAR-10", "lr-sweep": "Step-size sweep, {column}",
              "scalability": "Scalability (Table III), {column}"}


def parse_overrides(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Any]:
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--override {pair!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=sorted(SET_TITLES))
    parser.add_argument("--column", choices=sorted(COLUMNS), default="5w1s", help="Table II column (table2 only)")
    parser.add_argument("--rows", nargs="*", help="run only these rows (file names without .yaml)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--engine", choices=("plain", "flower"), default="plain")
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="cells run at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: cores / jobs)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/experiments/<scale>/<set>")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="scenario keys for every cell, after the scale's (e.g. algorithm.iterations=200)")
    parser.add_argument("--plot-only", action="store_true", help="only summarise the runs already there")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the set's tables and plots (not its runs) to docs/results/<scale>/")
    args = parser.parse_args(argv)
    name = f"{args.set}-{args.column}" if args.set in ("table2", "lr-sweep", "scalability") else args.set
    out = (args.out or Path("results") / "experiments" / args.scale / name).resolve()
    cells = cells_for(args.set, args.column, args.rows, args.scale, out, parse_overrides(parser, args.override))
    if not args.plot_only:
        run_cells(cells, args.engine, args.jobs, args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
    if args.rows:  # the table shows the whole set, whatever this call ran
        cells = cells_for(args.set, args.column, None, args.scale, out)
    rows = [row for row in (summarize(cell, args.scale) for cell in cells) if row]
    if not rows:
        sys.exit(f"no finished runs under {out / 'runs'}")
    add_cost_ratios(rows)
    title = SET_TITLES[args.set].format(column=args.column)
    write_outputs(name, rows, out, title, list(COLUMNS).index(args.column) if args.set == "table2" else None)
    if args.publish:
        published = APP_DIR / "docs" / "results" / args.scale
        published.mkdir(parents=True, exist_ok=True)
        for path in out.glob(f"{name}*.*"):
            shutil.copy2(path, published / path.name)
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
