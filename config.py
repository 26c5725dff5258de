"""Run configuration: frozen dataclasses (TrainConfig, and SFTConfig for chat fine-tuning), Python
config files, type-checked --key=value overrides, and every check of a config's values.

A config file is plain Python that defines `config`, e.g. configs/tiny.py:

    from config import TrainConfig
    config = TrainConfig(out_dir="out/tiny", model="tiny", steps=500, ...)

`load(path, ["--lr=1e-4", "--mesh=1,4,2"])` executes the file, takes its `config` and applies the
overrides. An override must name a field (an unknown key is an error that lists the valid ones)
and parse as that field's type; nothing is coerced silently. `validate` is the one place where
values are checked, before any data is read or anything compiled: every entry point calls it.
`resume_changes` compares a resumed run's config with its checkpoint's, key by key (RESUMABLE:
the keys that may change mid-run). `command` runs every command's main: a user's error ends in
one line, `--debug` shows the traceback.
"""
import dataclasses
import importlib.util
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass

import jax

import attention
import model
import sharding


@dataclass(frozen=True)
class Source:
    """A named set of files. Pretraining: `weight` is its share of training tokens relative to the
    other sources (0: evaluated, never trained on) and `field` names the text in each record (The
    Stack and RefinedWeb use "content", RedPajama "text"). Chat data: `weight` is how many times each example is seen per
    epoch and `field` is unused (the layout is detected per record)."""
    name: str
    paths: tuple[str, ...]  # globs
    weight: float  # 0: held out and evaluated, never trained on (an ablation's control)
    field: str = "text"
    eval_fraction: float = 0.01  # records held out for evaluation

    def __post_init__(self):
        if isinstance(self.paths, str):
            raise TypeError(f"source {self.name!r}: paths must be a tuple of globs, not a string")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"source {self.name!r}: weight must be a finite number >= 0, got {self.weight}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"source {self.name!r}: eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass(frozen=True)
class TrainConfig:
    # where checkpoints, metrics.jsonl and config.json go; a run resumes from here automatically
    out_dir: str = "out/run"
    # a preset name of model.PRESETS ("tiny", "llama2_7b", "llama2_13b", "llama2_70b"), or, in a
    # config file, a model.Config for other shapes (ablations)
    model: "str | model.Config" = "tiny"
    # "" = random init; "hf:DIR" = a Hugging Face Llama directory (safetensors); "ckpt:DIR" = the
    # params of another run's checkpoint (its out_dir: the newest one; or one step directory)
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
    # data: Source entries mixed by token weight; empty = the built-in demo corpus (formats/demo.py)
    sources: tuple = ()
    # sentencepiece model; "" = the demo tokenizer built with the demo corpus
    tokenizer: str = ""
    # keep attention inside documents (packed rows carry segment ids); Llama-2 and Lemur do not
    document_mask: bool = False
    # bad records (malformed JSON, missing field, ...): "skip" (counted, logged) or "raise"
    bad_records: str = "skip"
    log_every: int = 10
    eval_every: int = 500  # steps between evaluations of each source's held-out rows; 0 = never
    eval_batches: int = 4  # held-out batches per source per evaluation
    # also write the metrics as TensorBoard event files in out_dir/tensorboard (when tensorboardX is
    # installed), and to this W&B project ("" = no W&B; needs wandb)
    tensorboard: bool = True
    wandb_project: str = ""
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # at the end of the run, print a greedy continuation of this prompt ("" = none)
    sample_prompt: str = ""
    # consecutive non-finite losses (updates skipped) after which the run stops
    max_nonfinite_steps: int = 5


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Chat fine-tuning (sft.py): TrainConfig's keys with the paper's SFT recipe as defaults."""
    out_dir: str = "out/chat"
    # the model to fine-tune: "ckpt:DIR" (a training out_dir, its newest checkpoint, or one step
    # directory) or "hf:DIR" (a Hugging Face Llama directory); `model` must name its architecture
    init_from: str = ""
    # Source(name, globs, weight, eval_fraction=...): weight = times each example is seen per
    # epoch (`field` is unused: layouts are detected per record); () = the built-in stdlib Q&A set
    sources: tuple = ()
    epochs: int = 2
    steps: int = 0  # 0 = all epochs: ceil(packed rows / batch_size); > 0 caps the run (smoke tests)
    warmup_ratio: float = 0.03  # warmup_steps = round(warmup_ratio * steps) when warmup_steps is 0
    warmup_steps: int = 0
    lr: float = 2e-5
    end_lr: float = 0.0  # the paper's gap: cosine to 0 after 3% warmup (the Alpaca/Vicuna recipe)
    b2: float = 0.999  # the paper says Adam: PyTorch/HF defaults; pretraining used 0.95
    batch_size: int = 128
    document_mask: bool = True


def model_config(cfg: TrainConfig) -> model.Config:
    """The model.Config a run names: a preset by name, or the Config a config file gives."""
    return cfg.model if isinstance(cfg.model, model.Config) else model.preset(cfg.model)


def validate(cfg: TrainConfig, mcfg: model.Config | None = None, device_count: int | None = None,
             process_count: int = 1, platform: str | None = None):
    """Raise naming the key for any value that would make a run fail later or go silently wrong.
    mcfg: the run's model (None: the checks against it wait); device_count: the devices the run
    will use (None for a compile for another machine's slice, which checks its own mesh);
    platform: theirs ("cpu", "gpu", "tpu"), which the attention kernel must suit."""
    def bad(key, why):
        return ValueError(f"config: {key}={getattr(cfg, key)!r} {why}")

    chat = isinstance(cfg, SFTConfig)
    for key in ("batch_size", "seq_len", "microbatches", "log_every", "checkpoint_every", "keep_checkpoints",
                "max_nonfinite_steps"):
        if getattr(cfg, key) <= 0:
            raise bad(key, "must be positive")
    if cfg.steps < 0 or (cfg.steps == 0 and not chat):
        raise bad("steps", "must be positive" + (" (or 0: all epochs)" if chat else ""))
    if cfg.warmup_steps < 0 or (cfg.steps and cfg.warmup_steps > cfg.steps):
        raise bad("warmup_steps", f"must lie in [0, steps={cfg.steps}]")
    if cfg.eval_every < 0:
        raise bad("eval_every", "must be positive, or 0 to switch evaluation off")
    if cfg.eval_every and cfg.eval_batches <= 0:
        raise bad("eval_batches", "must be positive while eval_every > 0 (eval_every=0 switches evaluation off)")
    for key in ("lr", "end_lr", "weight_decay"):  # a negative lr is gradient ascent
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise bad(key, "must be a finite number >= 0")
    for key in ("b1", "b2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise bad(key, "must lie in [0, 1)")
    if not (math.isfinite(cfg.grad_clip) and cfg.grad_clip > 0):
        raise bad("grad_clip", "must be a finite global norm > 0")
    if chat and cfg.epochs <= 0:
        raise bad("epochs", "must be positive")
    if chat and not 0 <= cfg.warmup_ratio <= 1:
        raise bad("warmup_ratio", "must lie in [0, 1]")
    if cfg.batch_size % cfg.microbatches:
        raise bad("batch_size", f"is not divisible by microbatches={cfg.microbatches}")
    if cfg.batch_size % process_count:
        raise bad("batch_size", f"is not divisible by {process_count} processes")
    kinds = ("hf:", "ckpt:") if chat else ("", "hf:", "ckpt:")
    if not cfg.init_from.startswith(kinds) or (cfg.init_from and not cfg.init_from.partition(":")[2]):
        raise bad("init_from", "must be " + ("" if chat else "'' (random), ") + "'hf:DIR' or 'ckpt:DIR'")
    if cfg.bad_records not in ("skip", "raise"):
        raise bad("bad_records", "must be 'skip' or 'raise'")
    try:
        check_mesh(cfg.mesh, device_count)
    except ValueError as e:
        raise bad("mesh", str(e)) from None
    if mcfg is not None:
        check_model(mcfg)
        if cfg.seq_len > mcfg.max_seq_len:
            raise bad("seq_len", f"exceeds the model's max_seq_len={mcfg.max_seq_len}")
        sharding.check_divisible(mcfg, dict(zip(("data", "fsdp", "tensor"), cfg.mesh)),
                                 cfg.batch_size // cfg.microbatches, cfg.seq_len)
        if platform is not None:
            try:
                attention.resolve(mcfg.attention, platform, cfg.document_mask)
            except ValueError as e:
                raise ValueError(f"config: model attention: {e}") from None


def check_mesh(mesh, device_count: int | None = None, all_devices: bool = True):
    """Mesh sizes (data, fsdp, tensor), of a config or a command's --mesh: three positive sizes whose
    product is the device count (all_devices=False: at most it; the first devices are used)."""
    if len(mesh) != 3 or min(mesh) <= 0:
        raise ValueError("must be three positive sizes (data, fsdp, tensor)")
    if device_count is not None and (math.prod(mesh) > device_count or all_devices and math.prod(mesh) != device_count):
        raise ValueError(f"(data, fsdp, tensor) needs {math.prod(mesh)} devices, this run has {device_count}")


def parse_mesh(text: str, device_count: int, all_devices: bool = True) -> tuple:
    """A command's --mesh=DATA,FSDP,TENSOR, checked (check_mesh)."""
    try:
        mesh = tuple(int(n) for n in text.split(","))
    except ValueError:
        mesh = ()
    try:
        check_mesh(mesh, device_count, all_devices)
    except ValueError as e:
        raise ValueError(f"--mesh={text}: {e}") from None
    return mesh


def command_mesh(text: str | None):
    """The mesh of a command that decodes (sample.py, the server): --mesh=DATA,FSDP,TENSOR over all
    devices of all processes (joining the others first), or one device without it. Raises
    ValueError naming --mesh."""
    if text is None:
        return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sharding.initialize_distributed()
    return sharding.make_mesh(*parse_mesh(text, jax.device_count()))


def check_model(mcfg: model.Config):
    """A model.Config the math can run: positive sizes, heads that divide, an even head dim (RoPE
    rotates pairs), a known compute dtype and remat policy."""
    def bad(key, why):
        return ValueError(f"model: {key}={getattr(mcfg, key)!r} {why}")

    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        if getattr(mcfg, key) <= 0:
            raise bad(key, "must be positive")
    if mcfg.dim % mcfg.n_heads or mcfg.head_dim % 2:
        raise bad("dim", f"must be n_heads={mcfg.n_heads} times an even head dim")
    if mcfg.n_heads % mcfg.n_kv_heads:
        raise bad("n_kv_heads", f"must divide n_heads={mcfg.n_heads}")
    if not (mcfg.rope_theta > 0 and mcfg.norm_eps > 0):
        raise bad("rope_theta" if not mcfg.rope_theta > 0 else "norm_eps", "must be positive")
    if mcfg.dtype not in ("float32", "bfloat16", "float16"):
        raise bad("dtype", "must be float32, bfloat16 or float16")
    if mcfg.remat not in model.REMAT_POLICIES:
        raise bad("remat", f"must be one of {', '.join(model.REMAT_POLICIES)}")
    if mcfg.attention not in attention.IMPLEMENTATIONS:
        raise bad("attention", f"must be one of {', '.join(attention.IMPLEMENTATIONS)}")


# ----------------------------------------------------------------------------- resuming a run
# The keys a resumed run may change, and why each is safe: none of them changes the data order or
# the update a step computes from a given state (mesh and microbatches only regroup the same sums),
# so the run continues from its checkpoint exactly and only what lies ahead changes. Every other
# key (seed, batch_size, seq_len, sources, tokenizer, the model's math, the optimizer's betas,
# ...) is fixed for the life of a run: resume_changes refuses a change of it before anything is
# written. docs/config.md has this table.
RESUMABLE = {
    "out_dir": "where the run lives (a run moved to another disk or bucket)",
    "steps": "the schedule ahead", "warmup_steps": "the schedule ahead", "warmup_ratio": "the schedule ahead",
    "lr": "the schedule ahead", "end_lr": "the schedule ahead",
    "log_every": "a cadence", "eval_every": "a cadence", "eval_batches": "evaluation only",
    "checkpoint_every": "a cadence", "keep_checkpoints": "a cadence",
    "tensorboard": "a tracking sink", "wandb_project": "a tracking sink",
    "sample_prompt": "end of run only", "max_nonfinite_steps": "a stopping rule",
    "bad_records": "same records up to a bad one, which 'raise' stops at and 'skip' passes",
    "mesh": "the same sums, laid out on other devices", "microbatches": "the same sums, in other chunks",
    **{f"model.{key}": "how, not what, the model computes" for key in model.HOW},
}


def flat_settings(cfg_json: dict, model_json: dict) -> dict:
    """{key: value} of a run's settings (its config and model as JSON), one entry per key as
    overrides name them: `model.FIELD`, `sources.NAME.FIELD` (and `sources`: the source names)."""
    out = {k: v for k, v in cfg_json.items() if k not in ("model", "sources")}
    out.update({f"model.{k}": v for k, v in model_json.items()})
    sources = cfg_json.get("sources", [])
    if "sources" in cfg_json:
        out["sources"] = [s.get("name") if isinstance(s, dict) else s for s in sources]
    for s in sources:
        if isinstance(s, dict):
            out.update({f"sources.{s.get('name')}.{k}": v for k, v in s.items() if k != "name"})
    return out


def resume_changes(saved_config: dict, saved_model: dict, cfg, mcfg: model.Config, where: str) -> dict:
    """{key: [the checkpoint's value, this run's]} of the settings a resume from checkpoint `where`
    changes, each one in RESUMABLE; any other change is refused, in one line naming each key, both
    values and what to do instead. A key only one side knows (a checkpoint of older code) is not
    compared."""
    saved = flat_settings(saved_config, saved_model)
    new = flat_settings(json.loads(to_json(cfg)), json.loads(json.dumps(dataclasses.asdict(mcfg))))
    changed = {k: [saved[k], new[k]] for k in new if k in saved and saved[k] != new[k]}
    if "sources" in changed:  # another set of sources: their fields are not comparable one by one
        changed = {k: v for k, v in changed.items() if not k.startswith("sources.")}
    refused = [f"{k}={new!r} (it was trained with {old!r})" for k, (old, new) in changed.items() if k not in RESUMABLE]
    if refused:
        raise ValueError(f"config: cannot resume {where} with {', '.join(refused)}: "
                         f"{'these keys' if len(refused) > 1 else 'this key'} cannot change mid-run "
                         "(docs/config.md#resuming-a-run); resume with the checkpoint's value, or start a new run "
                         f"from its params with --out_dir=NEW --init_from=ckpt:{where}")
    return changed


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
    """Return `cfg` with `--key=value` overrides applied in order, each checked against the field's
    type. Two kinds of key reach inside a field: `--sources.NAME.FIELD=value` changes one source
    (`--sources.code.weight=3`: how data mixtures are swept) and `--model.FIELD=value` the model
    config (a preset is resolved first: `--model.n_layers=4`)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"override {arg!r} must look like --key=value")
        key, value = arg[2:].split("=", 1)
        head, _, rest = key.partition(".")
        if head == "sources" and rest:
            cfg = dataclasses.replace(cfg, sources=_override_source(cfg.sources, rest, value, key))
        elif head == "model" and rest:
            mcfg = model_config(cfg)
            cfg = dataclasses.replace(cfg, model=_override_field(mcfg, rest, value, key, "model"))
        elif key in fields:
            cfg = dataclasses.replace(cfg, **{key: _parse(value, hints[key], key)})
        else:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}, "
                             "sources.NAME.FIELD, model.FIELD")
    return cfg


def _override_field(obj, field: str, value: str, key: str, what: str):
    """obj (a frozen dataclass) with one field parsed from the command line."""
    hints = typing.get_type_hints(type(obj))
    if field not in hints:
        raise ValueError(f"--{key}: {what} has no field {field!r}; its fields: {', '.join(hints)}")
    return dataclasses.replace(obj, **{field: _parse(value, hints[field], key)})


def _override_source(sources: tuple, rest: str, value: str, key: str) -> tuple:
    name, _, field = rest.rpartition(".")
    names = [s.name for s in sources]
    if name not in names:
        raise ValueError(f"--{key}: no source named {name!r} in the config (its sources: "
                         f"{', '.join(names) or 'none, i.e. the demo corpus: name them in the config file'})")
    return tuple(_override_field(s, field, value, key, f"source {name!r}") if s.name == name else s for s in sources)


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


# errors a user can cause: a bad value or file (ValueError, and what checks raise), a missing or
# unreadable path, storage out of reach (OSError), a package not installed (ImportError)
USER_ERRORS = (ValueError, OSError, ImportError)


def command(main, argv: list[str] | None = None):
    """Run a command's main(argv) as its `if __name__ == "__main__"` does. An error a user can
    cause (USER_ERRORS) ends in one line `error: ...` on stderr and exit status 1; `--debug`
    anywhere on the command line shows its traceback instead. Other exceptions are bugs and keep
    their traceback; SystemExit (a usage line, a run that stops itself) passes through as it is."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--debug" in argv:
        return main([a for a in argv if a != "--debug"])
    try:
        return main(argv)
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
