"""TPU memory and MFU table from this CPU: aot.py's real TPU compile of the train step, row by row.

    python bench/aot.py                 # lemur70b on v4-512, llama2_7b on v4-8 and v4-32: attention and remat
    python bench/aot.py --rows 7b       # only the llama2_7b rows
    python bench/aot.py --smoke         # a tiny model on v4-8; tests/test_bench.py runs it

Each row is `aot.compile_train_step(config, topology)` (the same call as `python -m tools.aot CONFIG
--topology=...`): train.py's step lowered on the slice's compile-only devices and compiled by
libtpu. Per chip HBM from `compiled.memory_analysis()`: arguments (the state and one batch),
temporaries, total = arguments + outputs + temporaries - aliased (the donated state), as
aot.py returns them (`hbm_bytes`). "mfu" is aot.py's analytic estimate, not a
measurement. Needs libtpu (`pip install jax[tpu]`); each compile takes ~30-60 s on two CPU cores.
Last line: one JSON object with every row.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import config  # noqa: E402
import model  # noqa: E402
from tools import aot  # noqa: E402

# (name, config file or TrainConfig, overrides, topology, model.Config changes: attention, remat)
ROWS = {
    "70b": [("lemur70b", "configs/lemur70b.py", [f"--microbatches={m}"], "v4-512", {"attention": a})
            for a in ("jnp", "splash") for m in (4, 2)]
    + [("lemur70b", "configs/lemur70b.py", [f"--microbatches={m}"], "v4-512", {"remat": "offload"}) for m in (2, 1)],
    "7b": [("llama2_7b", "configs/llama2_7b.py", ["--mesh=1,4,1", f"--microbatches={m}"], "v4-8", {"remat": r})
           for m, r in ((64, "full"), (16, "offload"))]
    + [("llama2_7b", "configs/llama2_7b.py", ["--mesh=1,16,1", f"--microbatches={m}"], "v4-32", {"remat": r})
       for m, r in ((16, "full"), (4, "full"), (4, "offload"), (2, "offload"))],
}
SMOKE = ("tiny", config.TrainConfig(model=model.Config(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                                         ffn_dim=256, max_seq_len=128),
                                    batch_size=16, seq_len=128, microbatches=2, mesh=(1, 2, 2)), [], "v4-8", {})


def run(name, cfg, overrides, topology, changes) -> dict:
    """One row: compile (aot.py's own printing silenced) and return its result."""
    tcfg = config.load(os.path.join(ROOT, cfg), overrides) if isinstance(cfg, str) else cfg
    mcfg = dataclasses.replace(config.model_config(tcfg), **changes)
    tcfg = dataclasses.replace(tcfg, model=mcfg)
    with contextlib.redirect_stdout(io.StringIO()):
        result = aot.compile_train_step(tcfg, topology)
    hbm = result["hbm_bytes"] or {}  # None when the compiler refused it
    return {"model": name, "remat": mcfg.remat, **result,
            **{f"{k}_gib": hbm[k] / aot.GIB if k in hbm else None for k in ("argument", "output", "temp", "alias")}}


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", choices=("all", *ROWS), default="all")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    rows = [SMOKE] if args.smoke else [r for k, rs in ROWS.items() if args.rows in ("all", k) for r in rs]
    results = []
    print("| model | slice | mesh (data, fsdp, tensor) | microbatches | attention | remat | arguments GiB "
          "| temporaries GiB | total GiB/chip | fits | compile s | MFU estimate |")
    print("|" + "---|" * 12)
    for row in rows:
        r = run(*row)
        results.append(r)
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        print(f"| {r['model']} | {r['topology']} | {tuple(r['mesh'])} | {r['microbatches']} | {r['attention'] or '-'} "
              f"| {r['remat']} | {fmt(r['argument_gib'])} "
              f"| {fmt(r['temp_gib'])} | {fmt(r['hbm_per_chip_gib'])} | {'yes' if r['fits'] else 'no'} "
              f"| {r['compile_seconds']} | {r['mfu_estimate']:.3f} |", flush=True)
    print(json.dumps({"rows": results, "smoke": args.smoke}))


if __name__ == "__main__":
    main(sys.argv[1:])
