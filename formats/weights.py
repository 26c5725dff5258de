"""A model from where it is kept: a training checkpoint (a run's out_dir, its newest one, or one step
directory) or a Hugging Face Llama directory, local or in a bucket, read straight into the layout
the caller asks for, each process reading only the slices its devices hold.

    params, cfg, tokenizer = weights.load(path, lambda cfg: sharding.param_structs(cfg, mesh))
    params, cfg, tokenizer = weights.for_serving(path, mesh)      # decode.py's layout (sample, eval)

train.py's init_from, sample.py and harness.py all read models through `read`.
"""
import dataclasses

import jax

import decode
from formats import checkpoint, hf, storage
from formats.tokenizer import Tokenizer


def is_checkpoint(path: str) -> bool:
    return storage.exists(storage.join(path, "COMMIT")) or bool(checkpoint.committed(path))


def read(path: str, structs_of, kind: str = "auto", dtype: str | None = None):
    """(params, model config, checkpoint.Reader or None for a Hugging Face directory). kind: "ckpt",
    "hf" or "auto" (a checkpoint if `path` holds one); dtype replaces the config's compute dtype;
    structs_of(cfg) -> the target tree of jax.ShapeDtypeStruct (shapes, dtype, shardings), which
    may refuse the config by raising."""
    if kind == "auto":
        kind = "ckpt" if is_checkpoint(path) else "hf"
    reader = checkpoint.Reader(checkpoint.latest(path)) if kind == "ckpt" else None
    cfg = reader.model_config() if reader else hf.read_config(path)
    cfg = dataclasses.replace(cfg, dtype=dtype) if dtype else cfg
    structs = structs_of(cfg)
    if reader:
        return checkpoint.restore(reader, {"params": structs})[0]["params"], cfg, reader
    shardings = jax.tree.map(lambda s: s.sharding, structs)
    return hf.load_hf(path, shardings, dtype=jax.tree.leaves(structs)[0].dtype)[1], cfg, None


def load(path: str, structs_of, dtype: str | None = None):
    """(params, model config, tokenizer) of a checkpoint or Hugging Face directory (`read`), with
    the tokenizer the source carries."""
    params, cfg, reader = read(path, structs_of, dtype=dtype)
    return params, cfg, reader.tokenizer() if reader else Tokenizer.from_dir(path)


def for_serving(path: str, mesh, dtype: str | None = None):
    """(params in decode.py's layout on `mesh`, model config, tokenizer); `dtype` (e.g. "float32"
    to compare with a reference) replaces the model's compute dtype."""
    def structs_of(cfg):
        decode.check(cfg, mesh.shape)
        return decode.param_structs(cfg, mesh)
    return load(path, structs_of, dtype)
