"""ablate.py's bookkeeping (points, out_dirs, printed commands, resuming a half-done sweep, the
table), the overrides it sweeps with, and sources of weight 0."""
import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
from conftest import HANG, ROOT, subprocess_env
from runs import write_config

import config
from config import Source
import model
from data import Loader
from formats.tokenizer import Tokenizer


def test_overrides_reach_a_source_by_name_and_the_model(corpus, tmp_path):
    cfg = config.load(write_config(tmp_path / "cfg.py", corpus, tmp_path / "out"), [
        "--sources.code.weight=0", "--sources.text.eval_fraction=0.3", "--model.n_layers=3", "--model.remat=dots"])
    assert [(s.name, s.weight, s.eval_fraction) for s in cfg.sources] == [("code", 0.0, 0.2), ("text", 1.0, 0.3)]
    assert cfg.model.n_layers == 3 and cfg.model.remat == "dots" and cfg.model.dim == 64
    tiny = config.load(os.path.join(ROOT, "configs/tiny.py"), ["--model.n_layers=2"])
    assert tiny.model == dataclasses.replace(model.TINY, n_layers=2)  # a preset, resolved first
    for override, message in [("--sources.prose.weight=1", "no source named 'prose'.*its sources: code, text"),
                              ("--sources.code.wieght=1", "source 'code' has no field 'wieght'"),
                              ("--sources.code.weight=-1", "weight must be a finite number >= 0"),
                              ("--model.layers=2", "model has no field 'layers'")]:
        with pytest.raises(ValueError, match=message):
            config.load(write_config(tmp_path / "cfg.py", corpus, tmp_path / "out"), [override])
    with pytest.raises(ValueError, match="none, i.e. the demo corpus"):
        config.load(os.path.join(ROOT, "configs/tiny.py"), ["--sources.code.weight=1"])


def test_a_source_of_weight_0_is_evaluated_but_never_trained_on(corpus):
    tok = Tokenizer(str(corpus / "tok.model"))
    sources = [Source("code", (str(corpus / "code.jsonl"),), 0.0, eval_fraction=0.2),
               Source("text", (str(corpus / "text.jsonl"),), 1.0, eval_fraction=0.2)]
    loader = Loader(sources, tok, 32, 4, num_streams=2)
    trained = set()
    for _ in range(100):
        next(loader)
        trained.update(loader.row_sources)
    assert trained == {"text"} and loader.shares() == {"code": 0.0, "text": 1.0}
    assert set(loader.eval_batches(1)) == {"code", "text"}
    loader.close()
    with pytest.raises(ValueError, match="all have weight 0"):
        Loader([dataclasses.replace(s, weight=0.0) for s in sources], tok, 32, 4)


def sweep(cfg, sweep_dir, *extra):
    return subprocess.run([sys.executable, "-m", "tools.ablate", cfg, "--set", "sources.code.weight=0,10", "--set", "seed=0,1",
                           "--sweep_dir", str(sweep_dir), "--last_evals=2", *extra], cwd=ROOT, env=subprocess_env(4),
                          capture_output=True, text=True, timeout=2 * HANG)


def test_a_sweep_runs_each_point_once_and_tabulates_them(corpus, tmp_path):
    cfg = write_config(tmp_path / "cfg.py", corpus, tmp_path / "unused", eval_every=4)
    printed = sweep(cfg, tmp_path / "sweep", "--print")
    assert printed.returncode == 0 and len(printed.stdout.splitlines()) == 4, printed.stderr
    assert printed.stdout.splitlines()[1].startswith(f"python train.py {cfg} --sources.code.weight=0 --seed=1 --out_dir=")
    done = sweep(cfg, tmp_path / "sweep")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    names = ["sources.code.weight=0,seed=0", "sources.code.weight=0,seed=1", "sources.code.weight=10,seed=0",
             "sources.code.weight=10,seed=1"]
    assert sorted(n for n in os.listdir(tmp_path / "sweep") if not n.startswith(".")) == sorted(
        names + ["results.csv", "results.md", "results.png"])
    with open(tmp_path / "sweep" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["sources.code.weight"], r["seeds"]) for r in table] == [("0", "2"), ("10", "2")]
    for row, weight in zip(table, ("0", "10")):  # the table's numbers, from the runs' own metrics
        code = []
        for seed in (0, 1):
            with open(tmp_path / "sweep" / f"sources.code.weight={weight},seed={seed}" / "metrics.jsonl") as f:
                code.append(statistics.mean([r["eval/code"] for r in map(json.loads, f) if "eval/code" in r][-2:]))
        assert float(row["eval/code"]) == pytest.approx(statistics.mean(code), rel=1e-9)
        assert float(row["eval/code sd"]) == pytest.approx(statistics.stdev(code), rel=1e-9)
        assert float(row["tokens"]) == 16 * 8 * 32
    assert float(table[1]["eval/code"]) < float(table[0]["eval/code"])  # code trained on, code better

    # half done: one point gone, another back at its step-8 checkpoint; the rest must not rerun
    shutil.rmtree(tmp_path / "sweep" / names[0])
    for step in (12, 16):
        shutil.rmtree(tmp_path / "sweep" / names[3] / f"step_{step:08d}")
    untouched = {n: os.stat(tmp_path / "sweep" / n / "metrics.jsonl").st_mtime_ns for n in names[1:3]}
    again = sweep(cfg, tmp_path / "sweep")
    assert again.returncode == 0 and again.stdout.count("] sources.code.weight=") == 2, again.stdout[-2000:]
    assert "resumed from" in again.stdout + again.stderr
    assert {n: os.stat(tmp_path / "sweep" / n / "metrics.jsonl").st_mtime_ns for n in names[1:3]} == untouched
    with open(tmp_path / "sweep" / "results.csv") as f:
        again_table = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["eval/code"]) for r in again_table], [float(r["eval/code"]) for r in table])

    # bench/tradeoff.py reads the table (the demo sweep's trade-off check; a smoke run here)
    report = subprocess.run([sys.executable, "bench/tradeoff.py", str(tmp_path / "sweep")], cwd=ROOT,
                            capture_output=True, text=True, timeout=HANG)
    result = json.loads(report.stdout.splitlines()[-1])
    assert result["points"] == [0.0, 10.0] and result["code"]["change"] < 0 and result["code"]["rho"] == -1.0


def test_spearman_with_ties():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import tradeoff
    assert tradeoff.spearman([0, 1, 3, 10, 30], [5.0, 4.0, 3.5, 3.0, 2.0]) == pytest.approx(-1.0)
    assert tradeoff.ranks([2.0, 1.0, 2.0, 3.0]) == [2.5, 1.0, 2.5, 4.0]
    assert tradeoff.spearman([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
