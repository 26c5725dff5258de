"""Hugging Face Llama checkpoints <-> our params, streamed tensor by tensor.

    cfg, params = load_hf(dir)                     whole model on this host (small models)
    cfg, params = load_hf(dir, shardings=tree)     each process reads only its own slices
    save_hf(params, cfg, dir)                      a directory transformers.LlamaForCausalLM loads

Only `*.safetensors` directories are read (one file, or sharded with model.safetensors.index.json),
through tensorfile.py's memory maps: a 70B checkpoint (140 GB in bf16) loads into sharded params
on hosts with far less memory. Writing streams one tensor at a time into files of at most
`max_shard_bytes`. `python -m tools.convert` exports a training checkpoint with this module.

Layouts. HF Linear weights are (out, in); ours are (in, out) with heads split out, layers stacked:
  q_proj (N*H, D) -> wq[l] (D, N, H)     o_proj (D, N*H) -> wo[l] (N, H, D)
  gate/up (F, D)  -> w_gate/w_up[l] (D, F)  down (D, F) -> w_down[l] (F, D)
  lm_head (V, D)  -> output (D, V)        embed_tokens (V, D) -> embed (V, D)
q/k rows are already in the rotate-half RoPE layout that model.py uses: no permutation.
"""
import json
import math
import re

import jax
import ml_dtypes
import numpy as np

import model
from formats import storage
from formats.tensorfile import SafetensorsDir, sharded_array, write_safetensors

# our param -> (HF name template, how its dims map): "identity" or a transpose whose HF dims are
# (out, in) and whose "out" dim is split into the trailing our-dims of `out_dims` (heads, head_dim).
_LAYOUT = {
    "embed": ("model.embed_tokens.weight", None),
    "norm": ("model.norm.weight", None),
    "output": ("lm_head.weight", "T"),
    "layers/attn_norm": ("model.layers.{}.input_layernorm.weight", None),
    "layers/mlp_norm": ("model.layers.{}.post_attention_layernorm.weight", None),
    "layers/wq": ("model.layers.{}.self_attn.q_proj.weight", "T"),
    "layers/wk": ("model.layers.{}.self_attn.k_proj.weight", "T"),
    "layers/wv": ("model.layers.{}.self_attn.v_proj.weight", "T"),
    "layers/wo": ("model.layers.{}.self_attn.o_proj.weight", "T"),
    "layers/w_gate": ("model.layers.{}.mlp.gate_proj.weight", "T"),
    "layers/w_up": ("model.layers.{}.mlp.up_proj.weight", "T"),
    "layers/w_down": ("model.layers.{}.mlp.down_proj.weight", "T"),
}
# our dims grouped by the HF dim they come from, in our order; "T" layouts read HF dims (1, 0)
_GROUPS = {"wq": ((0,), (1, 2)), "wk": ((0,), (1, 2)), "wv": ((0,), (1, 2)), "wo": ((0, 1), (2,))}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}  # of saved weights
# what an export writes: save_hf's weights, index and config, and the tokenizer beside them
_EXPORT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json"
                          r"|tokenizer\.model|added_tokens\.json|tokenizer_config\.json)$")


def export_files(path: str) -> list[str]:
    """The files in directory `path` that an export writes (none if it does not exist)."""
    return sorted(n for n in storage.listdir(path) if _EXPORT_FILE.match(n))

# ----------------------------------------------------------------------------- config.json

def read_config(path: str) -> model.Config:
    """A Hugging Face Llama config.json -> model.Config; anything we would silently get wrong is
    an error naming the key."""
    file = storage.join(path, "config.json")
    if not storage.isfile(file):
        raise FileNotFoundError(f"{file}: no config.json (is {path} a Hugging Face model directory?)")
    hf = json.loads(storage.read_bytes(file))

    def bad(key, why):
        return ValueError(f"{file}: {key}={hf.get(key)!r}: {why}")

    if hf.get("model_type") != "llama":
        raise bad("model_type", "not a Llama model")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise bad("rope_scaling" if hf.get("rope_scaling") else "rope_parameters", "RoPE scaling is not supported")
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if hf.get(key):
            raise bad(key, "not part of Llama-2 and not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", "only silu (SwiGLU) is supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"{file}: missing key {key!r}")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise bad("head_dim", f"must be hidden_size / num_attention_heads = {hf['hidden_size'] // heads}")
    return model.Config(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)))


def hf_config(cfg: model.Config, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "dtype": dtype,
    }


# ----------------------------------------------------------------------------- layouts

def _hf_shape(key: str, our_shape: tuple) -> tuple:
    """HF shape of one layer (or the whole tensor) of our param `key` with per-layer shape."""
    if _LAYOUT[key][1] is None:
        return our_shape
    groups = _GROUPS.get(key.split("/")[-1], ((0,), (1,)))
    return tuple(math.prod(our_shape[d] for d in g) for g in reversed(groups))


def _read(ckpt: SafetensorsDir, name: str, key: str, our_shape: tuple, index: tuple):
    """Our param's per-layer block `index` (slices over our_shape), read from HF tensor `name`."""
    if _LAYOUT[key][1] is None:
        return ckpt.get_slice(name, index)
    groups = _GROUPS.get(key.split("/")[-1], ((0,), (1,)))
    hf_index = []
    for group in reversed(groups):  # HF dims are our groups in reverse (a transpose)
        first, rest = group[0], group[1:]
        for d in rest:  # only the leading dim of a merged group may be sliced (never head_dim)
            if index[d].indices(our_shape[d]) != (0, our_shape[d], 1):
                raise ValueError(f"{key}: cannot slice dim {d}; shard heads, not head_dim")
        inner = math.prod(our_shape[d] for d in rest)
        start, stop, _ = index[first].indices(our_shape[first])
        hf_index.append(slice(start * inner, stop * inner))
    block = ckpt.get_slice(name, tuple(hf_index)).T
    return block.reshape([len(range(*index[d].indices(our_shape[d]))) for d in range(len(our_shape))])


def flatten(tree, prefix=""):
    for k, v in tree.items():
        path = f"{prefix}{k}"
        yield from (flatten(v, path + "/") if isinstance(v, dict) else [(path, v)])


def unflatten(items):
    tree = {}
    for path, v in items:
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _check_tensors(ckpt: SafetensorsDir, cfg: model.Config, path: str):
    """Exactly the expected tensors with exactly the expected shapes, or an error naming them."""
    expected = {}
    for key, shape in flatten(model.param_shapes(cfg)):
        template = _LAYOUT[key][0]
        if key.startswith("layers/"):
            for i in range(cfg.n_layers):
                expected[template.format(i)] = _hf_shape(key, shape[1:])
        else:
            expected[template] = _hf_shape(key, shape)
    present = {n for n in ckpt.entries if not n.endswith(_IGNORED_SUFFIXES)}
    missing, extra = sorted(expected.keys() - present), sorted(present - expected.keys())
    if missing:
        raise ValueError(f"{path}: missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s): {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    for name, shape in expected.items():
        if ckpt.shape(name) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {ckpt.shape(name)}, expected {shape} from config.json")


# ----------------------------------------------------------------------------- load / save

def load_hf(path: str, shardings=None, dtype=np.float32):
    """Read a Hugging Face Llama directory -> (cfg, params), params in `dtype` (fp32: training;
    the compute dtype for decode.py, cast slice by slice as read).

    With `shardings` (a tree of jax.sharding.Sharding shaped like the params), every param is built
    with jax.make_array_from_callback: each process reads only the slices its devices hold, each once.
    """
    cfg = read_config(path)
    ckpt = SafetensorsDir(path)
    _check_tensors(ckpt, cfg, path)
    shard_tree = dict(flatten(shardings)) if shardings is not None else {}

    def read(key, shape, index):
        template = _LAYOUT[key][0]
        if not key.startswith("layers/"):
            return _read(ckpt, template, key, shape, index).astype(dtype)
        layers = range(*index[0].indices(shape[0]))  # stacked: one HF tensor per layer
        return np.stack([_read(ckpt, template.format(i), key, shape[1:], index[1:]) for i in layers]).astype(dtype)

    params = []
    for key, shape in flatten(model.param_shapes(cfg)):
        full = tuple(slice(None) for _ in shape)
        if key in shard_tree:
            array = sharded_array(shape, shard_tree[key], lambda idx, k=key, s=shape: read(k, s, idx))
        else:
            array = jax.numpy.asarray(read(key, shape, full))
        params.append((key, array))
    return cfg, unflatten(params)


def save_hf(params, cfg: model.Config, path: str, dtype: str = "bfloat16", max_shard_bytes: int = 5 << 30):
    """Write params as a Hugging Face Llama directory (config.json, sharded safetensors, index).
    Tensors are fetched one at a time (`np.asarray(x[i])` of a sharded array gathers one layer)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    np_dtype = DTYPES[dtype]
    flat = dict(flatten(params))
    tensors = []  # (name, shape, dtype, produce) in HF order
    for key, shape in flatten(model.param_shapes(cfg)):
        if tuple(flat[key].shape) != tuple(shape):
            raise ValueError(f"param {key} has shape {flat[key].shape}, config needs {shape}")

    def block(key, i=None):
        x = np.asarray(flat[key][i] if i is not None else flat[key], np.float32)
        if _LAYOUT[key][1] is None:
            return x
        return x.reshape(_hf_shape(key, x.shape)[::-1]).T

    shapes = dict(flatten(model.param_shapes(cfg)))
    for key in ("embed",):
        tensors.append((_LAYOUT[key][0], _hf_shape(key, shapes[key]), np_dtype, lambda k=key: block(k)))
    for i in range(cfg.n_layers):
        for key in shapes:
            if key.startswith("layers/"):
                tensors.append((_LAYOUT[key][0].format(i), _hf_shape(key, shapes[key][1:]), np_dtype, lambda k=key, i=i: block(k, i)))
    for key in ("norm", "output"):
        tensors.append((_LAYOUT[key][0], _hf_shape(key, shapes[key]), np_dtype, lambda k=key: block(k)))

    files, size = [[]], 0  # greedy split into files of at most max_shard_bytes
    for t in tensors:
        nbytes = math.prod(t[1]) * np.dtype(np_dtype).itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += nbytes
    storage.makedirs(path)
    for name in export_files(path):  # an earlier export's weights: its index would shadow these
        if name.startswith("model"):
            storage.remove(storage.join(path, name))
    names = ["model.safetensors"] if len(files) == 1 else [
        f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    weight_map = {}
    for name, group in zip(names, files):
        write_safetensors(storage.join(path, name), group)
        weight_map.update({t[0]: name for t in group})
    if len(files) > 1:
        total = sum(math.prod(t[1]) for t in tensors) * np.dtype(np_dtype).itemsize
        storage.write_bytes(storage.join(path, "model.safetensors.index.json"), json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode())
    storage.write_bytes(storage.join(path, "config.json"), json.dumps(hf_config(cfg, dtype), indent=2).encode())
