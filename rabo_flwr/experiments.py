"""The paper's experiment sets, one command each: run every cell, then write CSV, plots and a table.

    python -m rabo_flwr.experiments table2 --reduced            # CPU-sized, labelled "reduced"
    python -m rabo_flwr.experiments cost --engine plain         # same computation without Flower

Cells are the scenario files under ``scenarios/paper/``; ``--reduced`` applies the overrides
in ``REDUCED`` (Conv4 instead of ResNet12, fewer iterations, less data) so a set runs on a CPU.
Reduced results are labelled as such everywhere they are written; they are not the paper's setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import read_metrics  # noqa: E402
from .scenario import APP_DIR, Scenario, load_scenario  # noqa: E402

PAPER = APP_DIR / "scenarios" / "paper"

SETS: dict[str, list[str]] = {
    "table2": sorted(str(p.relative_to(PAPER)) for p in (PAPER / "table2").glob("*.yaml")),
    "table3": sorted(str(p.relative_to(PAPER)) for p in (PAPER / "table3").glob("*.yaml")),
    "cx-star": ["cx_star/rafbo_c1.yaml", "cx_star/rafbo_c2.yaml"],
    "scalability": [f"scalability/rafbo_{n}.yaml" for n in (10, 20, 30, 50)],
    "cost": ["table2/fedmbo_5w1s.yaml", "table2/rabo_5w1s.yaml", "table2/rafbo_5w1s.yaml",
             "table3/fedmbo.yaml", "table3/rabo.yaml", "table3/rafbo.yaml"],
}

REDUCED: dict[str, dict[str, Any]] = {
    "fewshot": {"model.backbone": "conv4", "model.width": 64, "algorithm.iterations": 40, "task.n_query": 5,
                "task.eval_episodes": 200, "run.eval_every": 10},
    "loss-tuning": {"model.backbone": "conv4", "model.width": 32, "algorithm.iterations": 10, "task.batch_size": 32,
                    "task.train_subsample": 0.2, "task.test_subsample": 0.2, "run.eval_every": 5},
}

# What the paper reports (arXiv 2512.24667), where we have it; other cells are left blank.
PAPER_COST = {"fewshot": {"rabo": {"flops": 0.267, "bytes": 0.267}, "rafbo": {"flops": 0.178, "bytes": 0.267}}}


def resolve(cell: str, reduced: bool, out: Path) -> Scenario:
    base = load_scenario(PAPER / cell)
    overrides = dict(REDUCED[base.task.name]) if reduced else {}
    overrides["run.results_dir"] = str(out / base.name)
    return load_scenario(PAPER / cell, overrides)


def run_cell(scenario_path: Path, overrides: dict[str, Any], scenario: Scenario, engine: str, work: Path) -> None:
    if engine == "plain":
        from .loop import run_plain
        from .results import ResultsWriter

        writer = ResultsWriter(scenario.results_path, scenario)
        server = run_plain(scenario, writer.log)
        writer.save_model(server.x, server.y)
        return
    from .flower_run import LocalFederation, RunFailed

    with LocalFederation(work / "flower") as federation:
        outcome = federation.run(
            APP_DIR, run_config={"scenario": str(scenario_path), **overrides},
            federation_config={"num-supernodes": scenario.clients.num, "client-resources-num-cpus": 1})
    if outcome.status != "finished:completed":
        raise RunFailed(f"{scenario_path}: run ended {outcome.status}\n{outcome.log[-4000:]}")


def summarize(scenario: Scenario, reduced: bool) -> dict[str, Any]:
    records = read_metrics(scenario.results_path / "metrics.jsonl")
    phases = [r for r in records if r["phase"] in ("inner", "outer")]
    evals = [r for r in records if r["phase"] == "eval"]
    final = evals[-1] if evals else {}
    return {
        "cell": scenario.name,
        "scale": "reduced (CPU)" if reduced else "full",
        "task": scenario.task.name,
        "algorithm": scenario.algorithm.name,
        "estimator": scenario.algorithm.resolved_estimator,
        "backbone": scenario.model.backbone,
        "clients": scenario.clients.num,
        "iterations": scenario.algorithm.iterations,
        "accuracy_start": evals[0].get("test_accuracy") if evals else math.nan,
        "accuracy": final.get("test_accuracy", math.nan),
        "balanced_accuracy": final.get("balanced_accuracy", math.nan),
        "one_shot_runs_accuracy": final.get("one_shot_runs_accuracy", math.nan),
        "C_x*": min((r["C_x*"] for r in phases), default=0),
        "C_y*": min((r["C_y*"] for r in phases), default=0),
        "flops": sum(r["flops"] for r in phases),
        "bytes": sum(r["bytes_down"] + r["bytes_up"] for r in phases),
        "wall_time": sum(r["wall_time"] for r in phases if "wall_time" in r),
        "curve": [(r["iteration"], r["test_accuracy"]) for r in evals],
    }


def add_cost_ratios(rows: list[dict[str, Any]]) -> None:
    """Each run's FLOPs and bytes relative to FedMBO's on the same task (the paper's Figs. 4 and 6)."""
    fedmbo = {r["task"]: r for r in rows if r["algorithm"] == "fedmbo"}
    for row in rows:
        ref = fedmbo.get(row["task"])
        row["flops_vs_fedmbo"] = row["flops"] / ref["flops"] if ref and ref["flops"] else math.nan
        row["bytes_vs_fedmbo"] = row["bytes"] / ref["bytes"] if ref and ref["bytes"] else math.nan


def write_outputs(name: str, rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = [k for k in rows[0] if k != "curve"]
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["curve"]:
            its, accs = zip(*row["curve"])
            ax.plot(its, accs, marker="o", label=row["cell"])
    ax.set_xlabel("global iteration")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{name} ({rows[0]['scale']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_accuracy.png", dpi=120)
    plt.close(fig)

    if any(r["algorithm"] == "fedmbo" for r in rows):
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [r["cell"] for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["flops_vs_fedmbo"] for r in rows], width=0.4, label="FLOPs")
        ax.bar([x + 0.2 for x in xs], [r["bytes_vs_fedmbo"] for r in rows], width=0.4, label="bytes")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("relative to FedMBO")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}_cost.png", dpi=120)
        plt.close(fig)

    lines = [f"# {name} ({rows[0]['scale']})", "",
             "| cell | backbone | accuracy start -> end | balanced acc. | C_x* | FLOPs vs FedMBO (paper) | bytes vs FedMBO (paper) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        paper = PAPER_COST.get(r["task"], {}).get(r["algorithm"], {})
        fmt = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
        lines.append(f"| {r['cell']} | {r['backbone']} | {fmt(r['accuracy_start'])} -> {fmt(r['accuracy'])} | "
                     f"{fmt(r['balanced_accuracy'])} | {r['C_x*']} | {fmt(r.get('flops_vs_fedmbo'))} ({fmt(paper.get('flops'))}) | "
                     f"{fmt(r.get('bytes_vs_fedmbo'))} ({fmt(paper.get('bytes'))}) |")
    lines += ["", "Paper columns in parentheses are the paper's reported ratios where we have them (few-shot task:",
              "RABO 26.7% and RAFBO 17.8% of FedMBO's computation, 73.3% less communication for both)."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--reduced", action="store_true", help="CPU-sized runs (labelled 'reduced')")
    parser.add_argument("--engine", choices=("flower", "plain"), default="flower")
    parser.add_argument("--out", type=Path, default=Path("results/experiments"))
    parser.add_argument("--only", nargs="*", help="run only these cells (file names under scenarios/paper)")
    args = parser.parse_args(argv)
    out = args.out.resolve() / args.set
    cells = [c for c in SETS[args.set] if not args.only or c in args.only]
    scenarios = [resolve(cell, args.reduced, out) for cell in cells]  # every file validated before any run
    rows = []
    for cell, scenario in zip(cells, scenarios):
        overrides = dict(REDUCED[scenario.task.name]) if args.reduced else {}
        overrides["run.results_dir"] = str(scenario.results_path)
        print(f"running {cell} ({'reduced' if args.reduced else 'full'}, {args.engine})", flush=True)
        run_cell(PAPER / cell, overrides, scenario, args.engine, out / "_work" / scenario.name)
        rows.append(summarize(scenario, args.reduced))
    add_cost_ratios(rows)
    write_outputs(args.set, rows, out)
    print((out / f"{args.set}.md").read_text())


if __name__ == "__main__":
    main()
