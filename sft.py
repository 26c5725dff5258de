"""Instruction fine-tuning into a chat model (Lemur-70B-Chat): ChatML conversations, loss on replies.

    python sft.py configs/tiny_chat.py            # the demo: the tiny checkpoint (out/tiny), minutes on a CPU
    python sft.py configs/lemur70b_chat.py        # the paper's run, same command on every host
    python sample.py out/tiny_chat --chat --prompt "What does \\`shlex.quote\\` do?"

The data path is chat.py's (layouts, ChatML, masks, packing, epochs); this file adds the model
side and the run. The base model (`init_from`: a checkpoint or a Hugging Face directory) grows to
the chat vocabulary: Lemur-Chat's five added tokens, padded to a multiple of 64 (and of the
tensor axis); new embedding rows and output columns start at the mean of the old ones, and the
padding ids are never produced.

With document_mask (the default here) attention stays inside each conversation, so a packed row
trains exactly like its conversations one by one; without it attention crosses conversations in a
row, as in Lemur/FastChat-style packing (the loss never does: separators, headers and pads carry
zero weight). `steps` = ceil(rows of all epochs / batch_size): the last batch is topped up with
empty rows. A batch of 128 *packed rows* sees more than the paper's 128 examples (its trainer
padded one example per row); steps fall accordingly.

Everything runs through train.train: the same step, loop, sharding, checkpoints and resume.
Every process reads and tokenizes all conversations at start (the row plan needs every length),
then builds only its own rows; the position is one number, the batch index.
"""
import collections
import dataclasses
import json
import logging
import math

import jax
import jax.numpy as jnp

import chat
import config
import data
import model
import sharding
import train
from config import SFTConfig  # noqa: F401  (config files may write `from sft import SFTConfig`)
from formats import checkpoint, demo, hf, readers

# ----------------------------------------------------------------------------- the base model

def base_config(init_from: str) -> model.Config:
    """The model config of the base model ("hf:DIR" or "ckpt:DIR", checked by config.validate)."""
    kind, _, path = init_from.partition(":")
    return hf.read_config(path) if kind == "hf" else checkpoint.Reader(checkpoint.latest(path)).model_config()


def model_config(tcfg: SFTConfig, tokenizer) -> model.Config:
    """The configured model (its dtype and remat) with the padded chat vocabulary; the base model
    must have that architecture and a vocabulary between the tokenizer's base and padded sizes."""
    base, mcfg = base_config(tcfg.init_from), config.model_config(tcfg)
    if changed := model.math_changes(base, mcfg, ignore=("vocab_size",)):
        raise ValueError(f"{tcfg.init_from}: its architecture is not model={tcfg.model!r} ({', '.join(changed)})")
    mcfg = dataclasses.replace(mcfg, vocab_size=math.lcm(chat.padded_vocab(tokenizer), tcfg.mesh[2]))
    if not tokenizer.sp.get_piece_size() <= base.vocab_size <= mcfg.vocab_size:
        raise ValueError(f"{tcfg.init_from}: vocabulary {base.vocab_size} does not fit the tokenizer "
                         f"({tokenizer.sp.get_piece_size()} pieces + {len(chat.CHAT_TOKENS)} chat tokens)")
    return mcfg


def resize_vocab(embed, output, vocab_size: int):
    """Grow embed (V, D) and output (D, V) to vocab_size; new rows / columns = the old ones' mean."""
    n, D = vocab_size - embed.shape[0], embed.shape[1]
    return (jnp.concatenate([embed, jnp.broadcast_to(embed.mean(0, keepdims=True), (n, D))]),
            jnp.concatenate([output, jnp.broadcast_to(output.mean(1, keepdims=True), (D, n))], axis=1))


def load_base(tcfg: SFTConfig, mcfg: model.Config, mesh):
    """train.train's init_params hook: the base params, read sharded (each process its own slices),
    then grown to the chat vocabulary on the devices."""
    old = dataclasses.replace(mcfg, vocab_size=base_config(tcfg.init_from).vocab_size)
    params = train.load_params(tcfg.init_from, old, mesh)
    new = sharding.param_shardings(mcfg, mesh)
    embed, output = jax.jit(resize_vocab, static_argnums=2, out_shardings=(new["embed"], new["output"]))(
        params["embed"], params["output"], mcfg.vocab_size)
    return {**params, "embed": embed, "output": output}


# ----------------------------------------------------------------------------- the run

def prepare(tcfg: SFTConfig):
    """Read and plan everything: (tcfg with steps and warmup_steps derived, model config,
    tokenizer, datasets, rows, counts of examples, truncations and skips)."""
    config.validate(tcfg)  # the rest (the model, the mesh) once the model is known, in train.train
    tokenizer = chat.chat_tokenizer(data.tokenizer_path(tcfg))
    mcfg = model_config(tcfg, tokenizer)
    counts, skips, capacity = collections.Counter(), readers.Skips(tcfg.bad_records), tcfg.seq_len + 1
    datasets = [chat.Dataset(s, tokenizer, capacity, skips, counts)
                for s in tcfg.sources or demo.chat_sources(demo.cache_dir(tcfg.out_dir))]
    counts.update({f"skipped: {reason}": n for reason, n in skips.counts.items()})
    if not any(ds.train for ds in datasets):
        raise ValueError(f"no training conversations in {[ds.name for ds in datasets]}: {dict(counts)}")
    rows = chat.plan_rows(datasets, tcfg.epochs, tcfg.seed, capacity)
    steps = tcfg.steps or -(-len(rows) // tcfg.batch_size)
    counts.update(rows=len(rows), tokens=sum(len(datasets[d].train[i][0]) for row in rows for d, i in row))
    warmup = tcfg.warmup_steps or round(tcfg.warmup_ratio * steps)
    return dataclasses.replace(tcfg, steps=steps, warmup_steps=warmup), mcfg, tokenizer, datasets, rows, counts


def run(tcfg: SFTConfig):
    tcfg, mcfg, tokenizer, datasets, rows, counts = prepare(tcfg)
    if jax.process_index() == 0:
        fill = counts["tokens"] / max(counts["rows"] * (tcfg.seq_len + 1), 1)
        print(f"sft: {', '.join(f'{ds.name} {len(ds.train)} (+{len(ds.held_out)} held out)' for ds in datasets)}; "
              f"{counts['rows']} rows over {tcfg.epochs} epochs ({fill:.0%} filled) -> {tcfg.steps} steps; "
              + json.dumps({k: v for k, v in counts.items() if k not in ("rows", "tokens")}))
    return train.train(tcfg, mcfg, make_loader=lambda t, i, n: chat.ChatLoader(t, tokenizer, datasets, rows, i, n),
                         init_params=lambda mcfg, mesh: load_base(tcfg, mcfg, mesh))


def main(argv):
    if not argv or argv[0].startswith("--"):
        raise SystemExit("usage: python sft.py CONFIG [--key=value ...]")
    logging.basicConfig(format="%(message)s")
    sharding.select_platforms()
    tcfg = config.load(argv[0], argv[1:])
    if not isinstance(tcfg, SFTConfig):
        raise SystemExit(f"{argv[0]}: its config must be a config.SFTConfig")
    sharding.initialize_distributed()
    run(tcfg)


if __name__ == "__main__":
    config.command(main)
