"""Run configuration: one frozen dataclass, Python config files, type-checked --key=value overrides.

A config file is plain Python that defines `config`, e.g. configs/tiny.py:

    from config import TrainConfig
    config = TrainConfig(out_dir="out/tiny", model="tiny", steps=300, ...)

`load(path, ["--lr=1e-4", "--mesh=1,4,2"])` executes the file, takes its `config` and applies the
overrides. An override must name a field (an unknown key is an error that lists the valid ones)
and parse as that field's type; nothing is coerced silently.
"""
import dataclasses
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass

import model


@dataclass(frozen=True)
class TrainConfig:
    # where checkpoints, metrics.jsonl and config.json go; a run resumes from here automatically
    out_dir: str = "out/run"
    # a preset name of model.PRESETS ("tiny", "llama2_7b", "llama2_13b", "llama2_70b"), or, in a
    # config file, a model.Config for other shapes (ablations)
    model: "str | model.Config" = "tiny"
    # "" = random init; "hf:DIR" = a Hugging Face Llama directory (safetensors)
    init_from: str = ""
    # the Lemur schedule: linear warmup from 0 to lr over warmup_steps, cosine to end_lr at steps.
    steps: int = 21458
    warmup_steps: int = 2000
    lr: float = 4e-5
    # the paper gives no final lr: 10% of peak, as Llama-2 did
    end_lr: float = 4e-6
    # the paper gives no weight decay: 0 = plain Adam. When set, only matrices decay (by path).
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # global gradient norm
    # global batch: batch_size sequences of seq_len tokens per optimizer step
    batch_size: int = 1024
    seq_len: int = 4096
    # the global batch is split into this many sequential microbatches (gradient accumulation)
    microbatches: int = 1
    # device mesh sizes (data, fsdp, tensor); their product must equal the device count
    mesh: tuple[int, int, int] = (1, 1, 1)
    seed: int = 0
    # data: data.Source entries mixed by token weight; empty = the built-in demo corpus (data.py)
    sources: tuple = ()
    # sentencepiece model; "" = the demo tokenizer built with the demo corpus
    tokenizer: str = ""
    # keep attention inside documents (packed rows carry segment ids); Llama-2 and Lemur do not
    document_mask: bool = False
    # bad records (malformed JSON, missing field, ...): "skip" (counted, logged) or "raise"
    bad_records: str = "skip"
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # at the end of the run, print a greedy continuation of this prompt ("" = none)
    sample_prompt: str = ""
    # consecutive non-finite losses (updates skipped) after which the run stops
    max_nonfinite_steps: int = 5


def _parse(value: str, typ, key: str):
    """Parse a command-line string as `typ`, or raise naming the key."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType) and str in typing.get_args(typ):
        typ = str  # e.g. model: a preset name on the command line
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(value)
        if typ in (int, float, str):
            return typ(value)
        if origin is tuple:
            args = typing.get_args(typ)
            parts = [p for p in value.replace(" ", "").split(",") if p]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(args[0](p) for p in parts)
            if args and len(parts) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(a(p) for a, p in zip(args, parts))
    except ValueError as e:
        raise ValueError(f"--{key}={value!r}: cannot parse as {getattr(typ, '__name__', typ)} ({e})") from None
    raise ValueError(f"--{key}: this key cannot be set from the command line (set it in the config file)")


def apply_overrides(cfg, args: list[str]):
    """Return `cfg` with `--key=value` overrides applied, each checked against the field's type."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"override {arg!r} must look like --key=value")
        key, value = arg[2:].split("=", 1)
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        changes[key] = _parse(value, hints[key], key)
    return dataclasses.replace(cfg, **changes)


def load(path: str, overrides: list[str] = ()):
    """Execute the config file at `path`, take its `config`, apply overrides."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ValueError(f"{path}: a config file must define `config`")
    return apply_overrides(module.config, list(overrides))


def to_json(cfg) -> str:
    """The resolved config as JSON (data sources written as their fields)."""
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
