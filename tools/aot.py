"""Compile the full train step for a TPU slice on this machine (no TPU needed) and report whether
it fits in HBM, with an analytic MFU estimate.

    python -m tools.aot configs/lemur70b.py --topology=v4-512 [--microbatches=4 --mesh=1,32,8 ...]
    python -m tools.aot --generate --topology=v4-16 [--batch=8 --context=4096 --chunk=512]

--generate compiles decode.Engine's two steps (the OpenAI server's and decode.generate's): a
prefill chunk of --chunk prompt tokens into one of --batch slots, and a decode step of all slots
(one token each), against a KV cache of --context positions per slot, for Llama-2-70B with
Lemur-Chat's vocabulary (32064) on a tensor-parallel mesh (1, 1, chips), and reports the HBM per
chip of each.

libtpu (`pip install jax[tpu]`) describes the slice's chips without any being attached
(jax.experimental.topologies); the real step of train.py (forward, backward, gradient
accumulation over the microbatches, clipping, Adam, donated state) is lowered with
jax.ShapeDtypeStruct arguments on a mesh of those chips and compiled by the real TPU compiler.
`compiled.memory_analysis()` is per chip: arguments (the state and a batch) + outputs + temporaries
- aliased (the donated state, reused for the new one), returned as data (`hbm_bytes`); the last line
printed is the whole result as one JSON object.

MFU estimate (XLA's cost analysis does not count loop trip counts, so it is done by hand; the
comms bounds are the scaling book's ring formulas, one bidirectional ICI link per axis, all
collectives assumed to overlap with compute, comms of different axes summed):
  model FLOPs/step     = tokens x model.flops_per_token    6 N + 6 L T D; N: matmul params (not
                                                           the embedding); 6 L T D: causal QK^T
                                                           and AV, forward and backward
  executed FLOPs/step  = model FLOPs + tokens x (2 N_layers + 2 L T D)  (full remat: forward again)
  compute time         = executed FLOPs / (chips x peak)
  fsdp comms           = M x 3 x (2 N / tensor) / W      gather fwd, gather again in bwd,
                                                           reduce-scatter grads; bf16 weights
  tensor comms         = M x L x 12 x (2 B T D) / W      all-gather + reduce-scatter of x[B, T, D]
                                                           around attention and MLP: 4 fwd, 4 in
                                                           the recompute, 4 bwd; B rows per chip
  data comms           = M x 2 x (4 N / (fsdp x tensor)) / W   all-reduce of fp32 gradient shards
  MFU                  = (model FLOPs / (chips x peak)) / max(compute time, comm time)
M microbatches, W the ICI bandwidth of one axis (bytes/s). Axes of size 1 cost nothing.
"""
import dataclasses
import json
import math
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU chips are described, not attached

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

import config  # noqa: E402
import decode  # noqa: E402
import model  # noqa: E402
import sharding  # noqa: E402
import train  # noqa: E402

GIB = 2 ** 30
# per chip: (jax topology prefix, chip config, HBM GiB, peak bf16 FLOP/s (sharding.PEAK_FLOPS, by
# device kind), ICI bytes/s per axis, tensor cores per chip (slice names count cores on v4/v5p,
# chips on v5e))
CHIPS = {"v4": ("v4", "megacore", 32.0, sharding.PEAK_FLOPS["TPU v4"], 9e10, 2),
         "v5p": ("v5p", "megacore", 95.0, sharding.PEAK_FLOPS["TPU v5p"], 1.8e11, 2),
         "v5e": ("v5e", "default", 16.0, sharding.PEAK_FLOPS["TPU v5 lite"], 9e10, 1)}
# torus shapes by chip count (v4/v5p: 3-D, v5e: 2-D)
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


def slice_spec(name: str) -> dict:
    """'v4-512' -> topology string, chip config, wrap-around, chip count and per-chip numbers."""
    chip, _, size = name.partition("-")
    if chip not in CHIPS or not size.isdigit():
        raise ValueError(f"unknown TPU slice {name!r}; expected one of {', '.join(CHIPS)} followed by -N, e.g. v4-512")
    prefix, chip_config, hbm, peak, ici, cores = CHIPS[chip]
    chips = int(size) // cores
    shapes = SHAPES_2D if chip == "v5e" else SHAPES_3D
    if chips not in shapes:
        raise ValueError(f"unknown TPU slice {name!r}; {chip} slices: "
                         f"{', '.join(f'{chip}-{n * cores}' for n in shapes)}")
    shape = shapes[chips]
    wrap = tuple(chips >= 64 and d >= 4 for d in shape)  # full-cube slices are tori
    return {"name": name, "topology": f"{prefix}:{'x'.join(map(str, shape))}", "chip_config": chip_config,
            "wrap": wrap + (False,) * (3 - len(wrap)), "chips": chips, "hbm_gib": hbm, "peak": peak, "ici": ici}


def topology_devices(spec: dict):
    """The slice's chips as compile-only JAX devices (needs libtpu, works on any machine)."""
    return topologies.get_topology_desc(platform="tpu", topology_name=spec["topology"],
                                        chip_config_name=spec["chip_config"], chips_per_host_bounds=(2, 2, 1),
                                        num_slices=1, wrap=spec["wrap"]).devices


def mfu_estimate(tcfg: config.TrainConfig, mcfg: model.Config, spec: dict) -> float:
    """Analytic MFU of one train step (the formulas of the module docstring)."""
    data, fsdp, tensor = tcfg.mesh
    chips, peak, W = math.prod(tcfg.mesh), spec["peak"], spec["ici"]
    L, D, T, M = mcfg.n_layers, mcfg.dim, tcfg.seq_len, tcfg.microbatches
    tokens = tcfg.batch_size * T
    n_matmul = model.param_count(mcfg) - mcfg.vocab_size * mcfg.dim  # the embedding is a lookup
    n_layers = n_matmul - mcfg.vocab_size * mcfg.dim - mcfg.dim  # the output layer is not recomputed
    model_flops = tokens * model.flops_per_token(mcfg, T)
    compute = (model_flops + tokens * (2 * n_layers + 2 * L * T * D)) / (chips * peak)
    rows = tcfg.batch_size // M // (data * fsdp)
    comms = ((fsdp > 1) * M * 3 * 2 * n_matmul / tensor
             + (tensor > 1) * M * L * 12 * 2 * rows * T * D
             + (data > 1) * M * 2 * 4 * n_matmul / (fsdp * tensor)) / W
    return model_flops / (chips * peak) / max(compute, comms)


def compile_train_step(tcfg: config.TrainConfig, topology: str) -> dict:
    """Compile train.py's step for the slice `topology`; print the HBM breakdown and a JSON line.
    Returns the result: fits, hbm_per_chip_gib, hbm_bytes {argument, output, temp, alias, total} per
    chip, compile_seconds, mfu_estimate (or an error when the compiler finds it does not fit)."""
    spec = slice_spec(topology)
    mcfg = config.model_config(tcfg)
    config.validate(tcfg, mcfg, platform="tpu")
    mesh = sharding.make_mesh(*tcfg.mesh, devices=topology_devices(spec))
    rows = tcfg.batch_size // tcfg.microbatches
    batch = {"tokens": jax.ShapeDtypeStruct((tcfg.microbatches, rows, tcfg.seq_len + 1), jnp.int32,
                                            sharding=sharding.batch_sharding(mesh, microbatched=True))}
    result = {"topology": topology, "chips": spec["chips"], "hbm_per_chip_gib": None, "hbm_bytes": None,
              "attention": None, "attention_kernels": None,
              "hbm_capacity_gib": spec["hbm_gib"], "fits": False, "mesh": list(tcfg.mesh),
              "microbatches": tcfg.microbatches, "compile_seconds": None,
              "mfu_estimate": round(mfu_estimate(tcfg, mcfg, spec), 3)}
    tx = train.make_optimizer(tcfg)
    start = time.time()
    stop = jax.ShapeDtypeStruct((mesh.size,), jnp.bool_, sharding=train.stop_sharding(mesh))
    lowered = train.make_train_step(tcfg, tx, mcfg, mesh).lower(train.state_structs(tx, mcfg, mesh), batch, stop)
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program that cannot fit in HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        result["compile_seconds"] = round(time.time() - start, 1)
        result["error"] = next((l.strip() for l in str(e).splitlines() if "memory" in l.lower()), str(e).splitlines()[0])
        print(f"{topology}: does not fit: {result['error']}")
        print(json.dumps(result))
        return result
    result["compile_seconds"] = round(time.time() - start, 1)
    # which attention the TPU program runs, read from the compiled program, not assumed from the config
    kernels = sorted(set(re.findall(r"splash_mha_\w+", compiled.as_text())))
    result["attention"], result["attention_kernels"] = ("splash" if kernels else "jnp"), kernels
    result.update(hbm(compiled, spec))
    total = result["hbm_bytes"]["total"]
    print(f"{tcfg.model} on {topology} ({spec['topology']}, {spec['chips']} chips), mesh (data, fsdp, tensor) = "
          f"{tuple(tcfg.mesh)}, {tcfg.microbatches} microbatches of {rows} x {tcfg.seq_len} tokens, "
          f"attention {result['attention']} ({', '.join(kernels) or 'jnp ops'})")
    for name, size in result["hbm_bytes"].items():
        print(f"  {name:>8} {size / GIB:8.2f} GiB per chip")
    if not result["fits"]:
        print(f"{topology}: does not fit: {total / GIB:.2f} GiB per chip > {spec['hbm_gib']} GiB of HBM")
    print(json.dumps(result))
    return result


def hbm(compiled, spec: dict) -> dict:
    """Per-chip HBM of a compiled program: arguments + outputs + temporaries - aliased (donated)."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"hbm_bytes": {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                          "temp": m.temp_size_in_bytes, "alias": -m.alias_size_in_bytes, "total": total},
            "hbm_per_chip_gib": round(total / GIB, 2), "fits": total <= spec["hbm_gib"] * GIB}


def compile_generate(topology: str, batch: int = 8, context: int = 4096, chunk: int = 512,
                     mcfg: model.Config = dataclasses.replace(model.LLAMA2_70B, vocab_size=32064)) -> dict:
    """Compile the steps of decode.Engine (the server's and generate's), against a cache of `batch`
    slots of `context` positions, for the slice (mesh (1, 1, chips)): a prefill chunk of `chunk`
    prompt tokens into one slot, and a decode step of all slots; print and return the HBM per chip
    of each, and whether both fit."""
    spec = slice_spec(topology)
    mesh = sharding.make_mesh(1, 1, spec["chips"], devices=topology_devices(spec))
    decode.check(mcfg, mesh.shape)
    cache = jax.ShapeDtypeStruct((mcfg.n_layers, batch, context, decode.cache_heads(mcfg, spec["chips"]), mcfg.head_dim),
                                 jnp.dtype(mcfg.dtype), sharding=jax.sharding.NamedSharding(mesh, decode.cache_spec()))

    def ints(*shape, dtype=jnp.int32, split=True):  # per-row arguments split like the rows; one slot's replicated
        spec_ = jax.sharding.PartitionSpec(sharding.BATCH) if split and shape else jax.sharding.PartitionSpec()
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec_))

    def sampling(rows, split):  # temperature, top_k, top_p, seed, token index per row
        return tuple(ints(rows, dtype=d, split=split) for d in (jnp.float32, jnp.int32, jnp.float32, jnp.uint32, jnp.int32))

    result = {"topology": topology, "chips": spec["chips"], "mesh": [1, 1, spec["chips"]], "batch": batch,
              "context": context, "prefill_chunk": chunk, "hbm_capacity_gib": spec["hbm_gib"],
              "params_gib": round(model.param_count(mcfg) * jnp.dtype(mcfg.dtype).itemsize / spec["chips"] / GIB, 2)}
    steps = {"prefill": (ints(1, chunk, split=False), ints(1, split=False), ints(1, split=False), sampling(1, False),
                         ints(dtype=jnp.int32, split=False)),
             "decode": (ints(batch, 1), ints(batch), ints(batch), sampling(batch, True), None)}
    for name, (tokens, lengths, start, sampling_, slot) in steps.items():
        begin = time.time()
        compiled = decode.step.lower(decode.param_structs(mcfg, mesh), tokens, lengths, {"k": cache, "v": cache}, start,
                                      sampling_, cfg=mcfg, mesh=mesh, vocab_size=mcfg.vocab_size, slot=slot).compile()
        result[name] = {**hbm(compiled, spec), "compile_seconds": round(time.time() - begin, 1)}
        print(f"{name}: {result[name]['hbm_per_chip_gib']:.2f} GiB per chip of {spec['hbm_gib']} "
              f"({'fits' if result[name]['fits'] else 'does not fit'})")
    result["fits"] = result["prefill"]["fits"] and result["decode"]["fits"]
    print(json.dumps(result))
    return result


def main(argv):
    topology = [a.split("=", 1)[1] for a in argv if a.startswith("--topology=")]
    if "--generate" in argv and len(topology) == 1:
        sizes = {a[2:].split("=")[0]: int(a.split("=")[1]) for a in argv if a.startswith(("--batch=", "--context=", "--chunk="))}
        return compile_generate(topology[0], **sizes)
    if not argv or argv[0].startswith("--") or len(topology) != 1:
        raise SystemExit("usage: python -m tools.aot CONFIG --topology=v4-512 [--key=value ...]\n"
                         "       python -m tools.aot --generate --topology=v4-16 [--batch=8 --context=4096 --chunk=512]")
    tcfg = config.load(argv[0], [a for a in argv[1:] if not a.startswith("--topology=")])
    return compile_train_step(tcfg, topology[0])


if __name__ == "__main__":
    config.command(main)
