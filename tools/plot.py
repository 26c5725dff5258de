"""Loss curves of one or several runs in one PNG: the train loss and each source's held-out loss
against the tokens trained, one color per run.

    python -m tools.plot out/tiny                                  # -> out/tiny/loss.png
    python -m tools.plot out/ablation_a out/ablation_b --out ab.png

Reads each run's metrics.jsonl (metrics of train.py and sft.py runs) and its config.json (the
tokens per step, to place evaluations, which record only their step). Runs are labelled by their
folder. Needs matplotlib (`pip install matplotlib`).
"""
import argparse
import io
import json
import os

from formats import readers, storage


def read_run(out_dir: str) -> dict:
    """{"train": ([tokens], [loss]), "eval/<source>": ([tokens], [loss]), ...} of a run."""
    run = json.loads(storage.read_bytes(storage.join(out_dir, "config.json")))
    per_step = run["batch_size"] * run["seq_len"]
    curves = {}
    for line in storage.read_bytes(storage.join(out_dir, "metrics.jsonl")).decode().splitlines():
        record = json.loads(line)
        points = {"train": record["loss"]} if "loss" in record else {
            k: v for k, v in record.items() if k.startswith("eval/")}
        for name, value in points.items():
            xs, ys = curves.setdefault(name, ([], []))
            xs.append(record.get("tokens", record["step"] * per_step))
            ys.append(value)
    return curves


def labels(out_dirs: list[str]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [d.rstrip("/").rsplit("/", 1)[-1] if storage.is_remote(d) else os.path.basename(os.path.abspath(d))
             for d in out_dirs]
    return [name if names.count(name) == 1 else os.path.normpath(d) for name, d in zip(names, out_dirs)]


def plot(out_dirs: list[str], out: str):
    matplotlib = readers.optional("matplotlib", "draw loss curves")
    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in out_dirs]
    panels = ["train"] + sorted({name for run in runs for name in run if name != "train"})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for color, (run, label) in enumerate(zip(runs, labels(out_dirs))):
            if panel in run:
                ax.plot(*run[panel], color=f"C{color}", label=label, marker="." if panel != "train" else None)
        ax.set_title("train loss" if panel == "train" else f"held-out loss: {panel[5:]}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(out, png.getvalue())


def main(argv):
    parser = argparse.ArgumentParser(description="Plot the loss curves of one or several runs into one PNG.")
    parser.add_argument("out_dirs", nargs="+", help="run folders (their metrics.jsonl and config.json)")
    parser.add_argument("--out", help="the PNG to write (default: loss.png in the first run's folder)")
    args = parser.parse_args(argv)
    for d in args.out_dirs:
        if not storage.isfile(storage.join(d, "metrics.jsonl")):
            parser.error(f"{d}: no metrics.jsonl (not a run's out_dir?)")
    out = args.out or storage.join(args.out_dirs[0], "loss.png")
    plot(args.out_dirs, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    import config  # here: plotting needs no jax, only the error line of every command
    config.command(main)
