"""Sweeps: one ordinary train.py run per point of a cross product of config values, then a table and
a figure of what each point learned.

    python -m tools.ablate configs/ablate_code_ratio.py --set sources.code.weight=0,0.3,1,3,10 \
        --set seed=0,1,2 --sweep_dir out/ablate_code_ratio
    python -m tools.ablate CONFIG --set lr=1e-3,3e-3 --sweep_dir DIR --steps=200    # --key=value: every point
    python -m tools.ablate CONFIG --set ... --sweep_dir DIR --print                  # commands for a scheduler

Each point trains in its own out_dir under the sweep folder (named after its values, e.g.
`sources.code.weight=10,seed=1`), so each resumes on its own and can be inspected, exported or
sampled; `--print` prints each point's train.py command instead of running it. Any key works,
`sources.NAME.FIELD` and `model.FIELD` included (config.apply_overrides). Points run one after
another; rerunning a sweep trains only what is missing (a finished point has its last step's
checkpoint; a half-done one resumes). The runs share one JAX compilation cache in the sweep folder.

Results, written after the runs (and by `--results_only` alone): DIR/results.csv and
DIR/results.md with, per point, the swept values, the tokens trained, the final train loss (the
last record's) and each source's held-out loss (the mean of its last `--last_evals`
evaluations); points that differ only in their seed are aggregated: the mean and the standard
deviation across seeds. DIR/results.png (needs matplotlib) plots each source's held-out loss
against the first swept key that is not the seed, one line per value of the others.
"""
import argparse
import csv
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys

import config
from formats import checkpoint, readers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def parse_sets(sets: list[str]) -> dict:
    """["key=v1,v2", ...] -> {key: [v1, v2]} in the order given."""
    swept = {}
    for item in sets:
        key, _, values = item.partition("=")
        if not key or not values:
            raise ValueError(f"--set {item!r} must look like KEY=V1,V2,...")
        if key in swept:
            raise ValueError(f"--set {key} is given twice")
        swept[key] = [v for v in values.split(",") if v]
    return swept


def points(swept: dict) -> list[dict]:
    """The cross product, as [{key: value}] (the first key varies slowest)."""
    return [dict(zip(swept, values)) for values in itertools.product(*swept.values())]


def point_name(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")


def command(config_path: str, point: dict, passthrough: list[str], out_dir: str, python=sys.executable,
            train=os.path.join(ROOT, "train.py")) -> list[str]:
    return [python, train, config_path, *passthrough, *(f"--{k}={v}" for k, v in point.items()),
            f"--out_dir={out_dir}"]


def finished(cfg, out_dir: str) -> bool:
    return cfg.steps in checkpoint.committed(out_dir)


def summary(out_dir: str, last_evals: int) -> dict:
    """tokens, final train loss and each source's held-out loss (mean of its last evaluations)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    train = [r for r in lines if "loss" in r]
    evals = {}
    for r in lines:
        for k, v in r.items():
            if k.startswith("eval/"):
                evals.setdefault(k[5:], []).append(v)
    return {"tokens": train[-1]["tokens"], "train_loss": train[-1]["loss"],
            **{f"eval/{s}": statistics.mean(v[-last_evals:]) for s, v in sorted(evals.items())}}


def aggregate(rows: list[dict], swept: dict) -> list[dict]:
    """Rows that differ only in their seed, as one: the mean and standard deviation of each number."""
    keys = [k for k in swept if k != "seed"]
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for values, group in groups.items():
        merged = dict(zip(keys, values), seeds=len(group))
        for name in (n for n in group[0] if n not in swept):
            numbers = [r[name] for r in group]
            merged[name] = statistics.mean(numbers)
            merged[f"{name} sd"] = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
        out.append(merged)
    return out


def write_results(sweep_dir: str, rows: list[dict], swept: dict):
    table = aggregate(rows, swept)
    columns = list(table[0])
    with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(table)
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) and not v.is_integer() else str(v)
    numbers = [c for c in columns if f"{c} sd" in columns]
    shown = [c for c in columns if not c.endswith(" sd") and c not in numbers] + numbers
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("| " + " | ".join(shown) + " |\n|" + "---|" * len(shown) + "\n")
        for row in table:
            spread = lambda c: f" ± {row[c + ' sd']:.4f}" if c in numbers and row[c + " sd"] > 0 else ""
            f.write("| " + " | ".join(cell(row[c]) + spread(c) for c in shown) + " |\n")
    keys = [k for k in swept if k != "seed"]
    try:
        if keys:  # a sweep over seeds alone has nothing to plot against
            plot(sweep_dir, table, keys)
    except ImportError as e:
        print(f"no results.png: {e}")
    return table


def plot(sweep_dir: str, table: list[dict], keys: list[str]):
    matplotlib = readers.optional("matplotlib", "draw results.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, others = keys[0], keys[1:]
    sources = [c[5:] for c in table[0] if c.startswith("eval/") and not c.endswith(" sd")]
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4), squeeze=False)
    lines = {}
    for row in table:
        lines.setdefault(tuple(row[k] for k in others), []).append(row)
    for ax, source in zip(axes[0], sources):
        for n, (label, rows) in enumerate(lines.items()):
            rows = sorted(rows, key=lambda r: _number(r[x_key]))
            ax.errorbar([_number(r[x_key]) for r in rows], [r[f"eval/{source}"] for r in rows],
                        yerr=[r[f"eval/{source} sd"] for r in rows], marker="o", capsize=3, color=f"C{n}",
                        label=", ".join(f"{k}={v}" for k, v in zip(others, label)) or None)
        if all(isinstance(_number(r[x_key]), float) and _number(r[x_key]) >= 0 for r in table):
            ax.set_xscale("symlog", linthresh=1)  # weights such as 0, 1, 3, 10, 30
        ax.set_title(f"held-out loss: {source}")
        ax.set_xlabel(x_key)
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "results.png"), dpi=100)
    plt.close(fig)


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def main(argv):
    parser = argparse.ArgumentParser(description="Sweep config values: one train.py run per point, then a table.")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2,...", help="a swept key")
    parser.add_argument("--sweep_dir", required=True, help="the folder of the points' out_dirs and the results")
    parser.add_argument("--print", action="store_true", help="print each point's train.py command, run nothing")
    parser.add_argument("--results_only", action="store_true", help="only (re)write the results of finished points")
    parser.add_argument("--last_evals", type=int, default=3, help="held-out loss: mean of this many last evaluations")
    args, passthrough = parser.parse_known_args(argv)
    if not args.set:
        parser.error("give at least one --set KEY=V1,V2,...")
    try:
        swept = parse_sets(args.set)
        plan = [(p, os.path.join(args.sweep_dir, point_name(p))) for p in points(swept)]
        cfgs = [config.load(args.config, passthrough + [f"--{k}={v}" for k, v in p.items()] + [f"--out_dir={d}"])
                for p, d in plan]
        for cfg in cfgs:  # every point's values checked before anything runs
            config.validate(cfg, config.model_config(cfg))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.print:
        for (p, d) in plan:  # from the repository's root, with whatever python the cluster has
            print(shlex.join(command(args.config, p, passthrough, d, python="python", train="train.py")))
        return
    os.makedirs(args.sweep_dir, exist_ok=True)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(args.sweep_dir, ".jax_cache")}
    for n, ((p, d), cfg) in enumerate(zip(plan, cfgs), 1):
        if args.results_only or finished(cfg, d):
            continue
        print(f"[{n}/{len(plan)}] {point_name(p)}", flush=True)
        done = subprocess.run(command(args.config, p, passthrough, d), env=env)
        if done.returncode:
            raise SystemExit(f"point {point_name(p)} failed (exit code {done.returncode}); rerun the sweep to resume")
    rows = [{**p, **summary(d, args.last_evals)} for (p, d), cfg in zip(plan, cfgs) if finished(cfg, d)]
    if not rows:
        raise SystemExit(f"{args.sweep_dir}: no finished point yet")
    table = write_results(args.sweep_dir, rows, swept)
    with open(os.path.join(args.sweep_dir, "results.md")) as f:
        print(f.read(), end="")
    print(f"{len(rows)} of {len(plan)} points in {args.sweep_dir}/results.csv, results.md"
          + (", results.png" if os.path.exists(os.path.join(args.sweep_dir, "results.png")) else ""))
    return table


if __name__ == "__main__":
    config.command(main)
