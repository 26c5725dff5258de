"""Instruction fine-tuning into a chat model (Lemur-70B-Chat): ChatML conversations, loss on replies.

    python sft.py configs/tiny_chat.py            # the demo: the tiny checkpoint (out/tiny), minutes on a CPU
    python sft.py configs/lemur70b_chat.py        # the paper's run, same command on every host
    python sample.py out/tiny_chat --chat --prompt "What does \\`shlex.quote\\` do?"

Formats, detected per record of `.json` arrays and `.jsonl` files: ShareGPT (`conversations:
[{from, value}]`), OpenAI (`messages: [{role, content}]`), Alpaca (`instruction`, `input`,
`output`) and Orca (`system_prompt`, `question`, `response`). Each becomes ChatML exactly as
Lemur-Chat: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, after a bos, ended by an eos.
The loss covers the assistant turns' content and their `<|im_end|>`, nothing else. Bad records
(no known format, unknown role, empty, not ending with an assistant reply, non-string content,
malformed JSON) are skipped and counted as `file:record: reason`, or raise (bad_records="raise").

Vocabulary. Lemur-Chat's five added tokens (its added_tokens.json: `<pad>` 32000, `<|im_start|>`
32001, `<|im_end|>` 32002, `<|im_sep|>` 32003, `<|diff_marker|>` 32004) follow the base vocabulary
in that order, so our ids are Lemur-Chat's; the model's vocabulary is then padded to a multiple
of 64 (32005 -> 32064) so every tensor-parallel size up to 64 splits it evenly. New embedding rows
and output columns start at the mean of the old ones; the padding ids are never produced.

Rows. Each dataset's examples appear `weight` times per epoch (a fraction picks a new random
subset each epoch), every epoch in a new order (seeded by seed and epoch); whole conversations are
packed in that order into rows of seq_len+1 tokens (next-fit) and the rest of a row is `<pad>`
with zero weight, so an example is never split across rows and each is seen exactly `epochs`
times. A conversation longer than a row is truncated and kept if a trainable token remains
(counted), else dropped (counted). With document_mask (the default here) attention stays inside
each conversation, so a packed row trains exactly like its conversations one by one; without it
attention crosses conversations in a row, as in Lemur/FastChat-style packing (the loss never
does: separators, headers and pads carry zero weight). `steps` = ceil(rows of all epochs /
batch_size): the last batch is topped up with empty rows. A batch of 128 *packed rows* sees more
than the paper's 128 examples (its trainer padded one example per row); steps fall accordingly.

Everything runs through train.train: the same step, loop, sharding, checkpoints and resume. Every
process reads and tokenizes all conversations at start (the row plan needs every length), then
builds only its own rows; the position is one number, the batch index.
"""
import ast
import collections
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import config
import data
import model
import sharding
import train

log = logging.getLogger("sft")
CHAT_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|diff_marker|>")
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
VOCAB_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class SFTConfig(config.TrainConfig):
    out_dir: str = "out/chat"
    # the model to fine-tune: "ckpt:DIR" (a training out_dir, its newest checkpoint, or one step
    # directory) or "hf:DIR" (a Hugging Face Llama directory); `model` must name its architecture
    init_from: str = ""
    # data.Source(name, globs, weight, eval_fraction=...): weight = times each example is seen per
    # epoch (`field` is unused: formats are detected per record); () = the built-in stdlib Q&A set
    sources: tuple = ()
    epochs: int = 2
    steps: int = 0  # 0 = all epochs: ceil(packed rows / batch_size); > 0 caps the run (smoke tests)
    warmup_ratio: float = 0.03  # warmup_steps = round(warmup_ratio * steps), derived, not set
    warmup_steps: int = 0
    lr: float = 2e-5
    end_lr: float = 0.0  # the paper's gap: cosine to 0 after 3% warmup (the Alpaca/Vicuna recipe)
    b2: float = 0.999  # the paper says Adam: PyTorch/HF defaults; pretraining used 0.95
    batch_size: int = 128
    document_mask: bool = True


class BadRecord(ValueError):
    """A record that cannot become a training conversation; the message is the reason."""


# ----------------------------------------------------------------------------- formats and ChatML

def chat_tokenizer(model_path: str) -> data.Tokenizer:
    """The base sentencepiece model with Lemur-Chat's added tokens (ids right after its vocab)."""
    return data.Tokenizer(model_path, added_tokens=CHAT_TOKENS)


def padded_vocab(tokenizer: data.Tokenizer) -> int:
    return -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def turns(record) -> list[tuple[str, str]]:
    """[(role, content)] with roles system/user/assistant, from a record of any known format."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    if "conversations" in record:
        raw = [(t.get("from"), t.get("value")) if isinstance(t, dict) else (None, None)
               for t in record["conversations"] or []]
    elif "messages" in record:
        raw = [(t.get("role"), t.get("content")) if isinstance(t, dict) else (None, None)
               for t in record["messages"] or []]
    elif "instruction" in record and "output" in record:
        inp = record.get("input") or ""
        question = record["instruction"] + "\n\n" + inp if isinstance(inp, str) and inp else record["instruction"]
        raw = [("user", question if isinstance(inp, str) else inp), ("assistant", record["output"])]
    elif "question" in record and "response" in record:
        system = record.get("system_prompt")
        raw = ([("system", system)] if system else []) + [("user", record["question"]), ("assistant", record["response"])]
    else:
        raise BadRecord(f"no known format (keys: {', '.join(sorted(record)[:6])})")
    if not raw:
        raise BadRecord("empty conversation")
    out = []
    for role, content in raw:
        if role not in ROLES:
            raise BadRecord(f"unknown role {role!r}")
        if not isinstance(content, str):
            raise BadRecord(f"non-string content ({type(content).__name__}) in a {role} turn")
        out.append((ROLES[role], content))
    if out[-1][0] != "assistant":
        raise BadRecord("does not end with an assistant turn")
    return out


def encode_turns(conversations: list, tokenizer: data.Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(tokens, mask)] of lists of turns: bos, ChatML turns, eos; mask 1 on the assistant turns'
    content and their <|im_end|>. Each `{role}\\n{content}` is one sentencepiece text (one call for
    all), as Hugging Face's Llama tokenizer splits the ChatML string; contents never turn into chat
    tokens. The mask needs the header's newline to stay a token of its own (true of Llama's
    tokenizer and the demo one: no piece contains a newline), which is checked."""
    start, end, newline = tokenizer.added["<|im_start|>"], tokenizer.added["<|im_end|>"], tokenizer.sp.encode("\n")
    headers = {role: tokenizer.sp.encode(role + "\n") for role in set(ROLES.values())}
    ids = iter(tokenizer.sp.encode([f"{role}\n{content}" for conv in conversations for role, content in conv]))
    out = []
    for conv in conversations:
        tokens, mask = [tokenizer.bos_id], [0]
        for role, _ in conv:
            turn, header = next(ids), headers[role]
            if turn[:len(header)] != header:
                raise ValueError(f"this tokenizer merges the newline after {role!r} with the content")
            tokens += [start, *turn, end, *newline]
            mask += [0] * (1 + len(header)) + [int(role == "assistant")] * (len(turn) - len(header) + 1) + [0] * len(newline)
        out.append((np.array(tokens + [tokenizer.eos_id], np.int32), np.array(mask + [0], np.int32)))
    return out


def encode_conversation(record, tokenizer: data.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of one record of any known format; raises BadRecord."""
    return encode_turns([turns(record)], tokenizer)[0]


def encode_prompt(conversation: list, tokenizer: data.Tokenizer) -> list[int]:
    """Tokens that ask for the next assistant turn: the turns so far, then `<|im_start|>assistant\\n`
    (the encoding of an empty reply, less its <|im_end|>, newline and eos)."""
    tokens, _ = encode_turns([list(conversation) + [("assistant", "")]], tokenizer)[0]
    return tokens[:-(2 + len(tokenizer.sp.encode("\n")))].tolist()


# ----------------------------------------------------------------------------- datasets

def _records(path: str):
    """(where, record or BadRecord) of a .json array or a .jsonl file; records numbered from 1."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json dataset must be an array of records")
        yield from ((f"{path}:{i}", r) for i, r in enumerate(records, 1))
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                try:
                    yield f"{path}:{i}", json.loads(line)
                except ValueError:
                    yield f"{path}:{i}", BadRecord("malformed JSON")
    else:
        raise ValueError(f"{path}: unknown format (expected .json or .jsonl)")


def _held_out(where: str, fraction: float) -> bool:
    """Stable across folders: a hash of the file's name and the record number."""
    digest = hashlib.blake2b(os.path.basename(where).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


class Dataset:
    """One source's conversations, encoded and cut to `capacity` tokens: train and held-out lists."""

    def __init__(self, src: data.Source, tokenizer, capacity: int, bad_records: str, counts: collections.Counter):
        if src.weight <= 0:
            raise ValueError(f"source {src.name!r}: weight must be > 0, got {src.weight}")
        files = sorted({f for pattern in src.paths for f in glob.glob(pattern, recursive=True)})
        if not files:
            raise FileNotFoundError(f"source {src.name!r}: {src.paths} match no files")
        self.name, self.weight, self.train, self.held_out = src.name, src.weight, [], []
        good = []
        for path in files:
            for where, record in _records(path):
                try:
                    if isinstance(record, BadRecord):
                        raise record
                    good.append((where, turns(record)))
                except BadRecord as e:
                    if bad_records == "raise":
                        raise BadRecord(f"{where}: {e}") from None
                    counts[f"skipped: {e}"] += 1
                    if sum(v for k, v in counts.items() if k.startswith("skipped")) <= data.MAX_LOGGED_SKIPS:
                        log.warning("%s: %s (skipped)", where, e)
        for i in range(0, len(good), 4096):  # one sentencepiece call per chunk
            chunk = good[i:i + 4096]
            for (where, _), (tokens, mask) in zip(chunk, encode_turns([t for _, t in chunk], tokenizer)):
                if len(tokens) > capacity:
                    tokens, mask = tokens[:capacity], mask[:capacity]
                    if not mask.any():
                        counts["dropped: too long, no trainable token within seq_len"] += 1
                        continue
                    counts["truncated to seq_len"] += 1
                (self.held_out if _held_out(where, src.eval_fraction) else self.train).append((tokens, mask))
                counts["examples"] += 1


def _pack(items: list, length, capacity: int) -> list[list]:
    """Next-fit: items, whole and in order, into rows of at most `capacity` tokens."""
    rows, row, used = [], [], 0
    for item in items:
        if row and used + length(item) > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(item)
        used += length(item)
    return rows + ([row] if row else [])


def plan_rows(datasets: list[Dataset], epochs: int, seed: int, capacity: int) -> list[list[tuple[int, int]]]:
    """Rows of all epochs, each a list of (dataset, example): per epoch `weight` copies of each
    dataset's examples (the fraction a random subset), shuffled, then packed."""
    rows = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        picks = []
        for d, ds in enumerate(datasets):
            n, whole = len(ds.train), int(ds.weight)
            picks += [(d, i) for i in [*range(n)] * whole + sorted(rng.permutation(n)[:round((ds.weight - whole) * n)])]
        order = [picks[j] for j in rng.permutation(len(picks))]
        rows += _pack(order, lambda p: len(datasets[p[0]].train[p[1]][0]), capacity)
    return rows


def make_rows(examples: list, seq_len: int, pad_id: int, document_mask: bool) -> dict:
    """A batch dict of packed rows: tokens (R, T+1), weights (R, T), segment_ids (R, T+1) 1, 2, ...
    per conversation and 0 on padding. An empty example list gives an all-padding row."""
    tokens = np.full((len(examples), seq_len + 1), pad_id, np.int32)
    mask = np.zeros((len(examples), seq_len + 1), np.float32)
    segments = np.zeros((len(examples), seq_len + 1), np.int32)
    for r, row in enumerate(examples):
        at = 0
        for s, (t, m) in enumerate(row, 1):
            tokens[r, at:at + len(t)], mask[r, at:at + len(t)], segments[r, at:at + len(t)] = t, m, s
            at += len(t)
    batch = {"tokens": tokens, "weights": mask[:, 1:]}  # weight of target t+1: is it a reply token?
    return {**batch, "segment_ids": segments} if document_mask else batch


class ChatLoader:
    """The train.py loader protocol over a fixed row plan: batch k is rows [k B, (k+1) B) of it."""

    def __init__(self, tcfg, tokenizer, datasets, rows, process_index=0, process_count=1):
        self.tcfg, self.tokenizer, self.datasets, self.rows = tcfg, tokenizer, datasets, rows
        self.local = tcfg.batch_size // process_count
        self.first, self.batch = process_index * self.local, 0

    def _build(self, rows, examples) -> dict:
        return make_rows([[examples[d][i] for d, i in row] for row in rows], self.tcfg.seq_len,
                         self.tokenizer.added["<pad>"], self.tcfg.document_mask)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.batch * self.tcfg.batch_size + self.first
        rows = self.rows[start:start + self.local]
        self.batch += 1
        return self._build(rows + [[]] * (self.local - len(rows)), [ds.train for ds in self.datasets])

    def state(self) -> dict:
        return {"batch": self.batch, "streams": {}}  # shaped like data.Loader's: data.merge_states joins it

    def restore(self, state: dict):
        self.batch = state["batch"]

    def eval_batches(self, n_batches: int) -> dict:
        """{dataset: up to n_batches batches} of held-out conversations, in file order, packed."""
        out, B = {}, self.tcfg.batch_size
        for d, ds in enumerate(self.datasets):
            rows = _pack([(d, i) for i in range(len(ds.held_out))], lambda p: len(ds.held_out[p[1]][0]),
                         self.tcfg.seq_len + 1)
            out[ds.name] = []
            for b in range(min(n_batches, -(-len(rows) // B))):
                mine = rows[b * B + self.first:b * B + self.first + self.local]
                out[ds.name].append(self._build(mine + [[]] * (self.local - len(mine)), {d: ds.held_out}))
        return out

    def close(self):
        pass


# ----------------------------------------------------------------------------- the built-in set

def demo_sources(cache_dir: str) -> tuple:
    """Questions about the standard library's public functions, answered by their docstrings'
    summary lines and their signatures, in all four formats. Built once into
    {cache_dir}/chat-py{X}{Y}/ (renamed into place when complete); deterministic per Python version."""
    final = os.path.join(cache_dir, f"chat-py{sys.version_info[0]}{sys.version_info[1]}")
    if not os.path.isfile(os.path.join(final, "COMPLETE")):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".building-")
        root, functions = sysconfig.get_paths()["stdlib"], []
        for name in sorted(n for n in os.listdir(root) if n.endswith(".py") and not n.startswith(("_", "test"))):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                functions += [(name[:-3], fn) for fn in ast.parse(f.read()).body if isinstance(fn, ast.FunctionDef)
                              and not fn.name.startswith("_") and ast.get_docstring(fn)]
        docs, signatures = [], []
        for i, (module, fn) in enumerate(functions[::2]):  # a subset: the demo trains in minutes
            q, a = f"What does `{module}.{fn.name}` do?", ast.get_docstring(fn).split("\n")[0]
            docs.append([{"instruction": q, "input": "", "output": a},
                         {"instruction": "Explain this Python function.", "input": f"{module}.{fn.name}", "output": a},
                         {"system_prompt": "You are a Python expert.", "question": q, "response": a},
                         {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}][i % 4])
        for module, fn in functions[1::4]:
            signatures.append({"conversations": [
                {"from": "human", "value": f"Which module defines `{fn.name}`?"},
                {"from": "gpt", "value": f"`{fn.name}` is defined in the `{module}` module."},
                {"from": "human", "value": "What is its signature?"},
                {"from": "gpt", "value": f"`{module}.{fn.name}({ast.unparse(fn.args)})`"}]})
        with open(os.path.join(tmp, "docs.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in docs)
        with open(os.path.join(tmp, "signatures.json"), "w") as f:
            json.dump(signatures, f, indent=1)
        open(os.path.join(tmp, "COMPLETE"), "w").close()
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its files are identical
            shutil.rmtree(tmp)
    return (data.Source("docs", (os.path.join(final, "docs.jsonl"),), 1.0, eval_fraction=0.05),
            data.Source("signatures", (os.path.join(final, "signatures.json"),), 1.0, eval_fraction=0.05))


# ----------------------------------------------------------------------------- the base model

def base_config(init_from: str) -> model.Config:
    kind, _, path = init_from.partition(":")
    if kind == "hf":
        import convert
        return convert.read_config(path)
    if kind == "ckpt":
        with open(os.path.join(checkpoint.latest(path), "meta.json")) as f:
            return model.Config(**json.load(f)["model"])
    raise ValueError(f"config: init_from={init_from!r} must be 'ckpt:DIR' or 'hf:DIR' (the model to fine-tune)")


def model_config(tcfg: SFTConfig, tokenizer: data.Tokenizer) -> model.Config:
    """preset(tcfg.model) (its dtype and remat) with the padded chat vocabulary; the base model
    must have that architecture and a vocabulary between the tokenizer's base and padded sizes."""
    base, mcfg = base_config(tcfg.init_from), model.preset(tcfg.model)
    strip = lambda c: dataclasses.replace(c, vocab_size=0, dtype="", remat="")
    if strip(base) != strip(mcfg):
        raise ValueError(f"{tcfg.init_from}: its architecture {base} is not model={tcfg.model!r}")
    mcfg = dataclasses.replace(mcfg, vocab_size=math.lcm(padded_vocab(tokenizer), tcfg.mesh[2]))
    if not tokenizer.sp.get_piece_size() <= base.vocab_size <= mcfg.vocab_size:
        raise ValueError(f"{tcfg.init_from}: vocabulary {base.vocab_size} does not fit the tokenizer "
                         f"({tokenizer.sp.get_piece_size()} pieces + {len(CHAT_TOKENS)} chat tokens)")
    return mcfg


def resize_vocab(embed, output, vocab_size: int):
    """Grow embed (V, D) and output (D, V) to vocab_size; new rows / columns = the old ones' mean."""
    n, D = vocab_size - embed.shape[0], embed.shape[1]
    return (jnp.concatenate([embed, jnp.broadcast_to(embed.mean(0, keepdims=True), (n, D))]),
            jnp.concatenate([output, jnp.broadcast_to(output.mean(1, keepdims=True), (D, n))], axis=1))


def load_base(tcfg: SFTConfig, mcfg: model.Config, mesh):
    """train.py's init_params hook: the base params, read sharded (each process its own slices),
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
    tokenizer, datasets, rows, counts)."""
    if tcfg.bad_records not in ("skip", "raise"):
        raise ValueError(f"config: bad_records must be 'skip' or 'raise', not {tcfg.bad_records!r}")
    if tcfg.epochs <= 0 or tcfg.steps < 0 or tcfg.warmup_steps or not 0 <= tcfg.warmup_ratio <= 1:
        raise ValueError(f"config: need epochs > 0, steps >= 0, warmup_ratio in [0, 1] and warmup_steps unset "
                         f"(derived), got {tcfg.epochs}, {tcfg.steps}, {tcfg.warmup_ratio}, {tcfg.warmup_steps}")
    cache = data.demo_dir(tcfg.out_dir)
    tokenizer = chat_tokenizer(tcfg.tokenizer or data.demo_corpus(cache)[1])
    mcfg = model_config(tcfg, tokenizer)
    counts, capacity = collections.Counter(), tcfg.seq_len + 1
    datasets = [Dataset(s, tokenizer, capacity, tcfg.bad_records, counts) for s in tcfg.sources or demo_sources(cache)]
    if not any(ds.train for ds in datasets):
        raise ValueError(f"no training conversations in {[s.name for s in tcfg.sources]}: {dict(counts)}")
    rows = plan_rows(datasets, tcfg.epochs, tcfg.seed, capacity)
    steps = tcfg.steps or -(-len(rows) // tcfg.batch_size)
    counts.update(rows=len(rows), tokens=sum(len(datasets[d].train[i][0]) for row in rows for d, i in row))
    return dataclasses.replace(tcfg, steps=steps, warmup_steps=round(tcfg.warmup_ratio * steps)), mcfg, tokenizer, \
        datasets, rows, counts


def run(tcfg: SFTConfig):
    tcfg, mcfg, tokenizer, datasets, rows, counts = prepare(tcfg)
    if jax.process_index() == 0:
        fill = counts["tokens"] / max(counts["rows"] * (tcfg.seq_len + 1), 1)
        print(f"sft: {', '.join(f'{ds.name} {len(ds.train)} (+{len(ds.held_out)} held out)' for ds in datasets)}; "
              f"{counts['rows']} rows over {tcfg.epochs} epochs ({fill:.0%} filled) -> {tcfg.steps} steps; "
              + json.dumps({k: v for k, v in counts.items() if k not in ("rows", "tokens")}))
    return train.train(tcfg, mcfg, make_loader=lambda t, i, n: ChatLoader(t, tokenizer, datasets, rows, i, n),
                       init_params=lambda mcfg, mesh: load_base(tcfg, mcfg, mesh))


def main(argv):
    if not argv or argv[0].startswith("--"):
        raise SystemExit("usage: python sft.py CONFIG [--key=value ...]")
    logging.basicConfig(format="%(message)s")
    tcfg = config.load(argv[0], argv[1:])
    if not hasattr(tcfg, "epochs"):
        raise SystemExit(f"{argv[0]}: its config must be an sft.SFTConfig")
    sharding.initialize_distributed()
    run(tcfg)


if __name__ == "__main__":
    main(sys.argv[1:])
