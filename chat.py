"""Chat data: conversations of any common layout -> ChatML exactly as Lemur-Chat -> packed rows
with a loss mask on the replies. sft.py trains on them; sample.py prompts with encode_prompt.

Layouts, detected per record: ShareGPT (`conversations: [{from, value}]`), OpenAI (`messages:
[{role, content}]`), Alpaca (`instruction`, `input`, `output`) and Orca (`system_prompt`,
`question`, `response`), from any format readers.py reads. Each becomes
`<|im_start|>{role}\n{content}<|im_end|>\n` per turn, after a bos, ended by an eos. The loss covers
the assistant turns' content and their `<|im_end|>`, nothing else. Bad records (no known layout,
an unknown role, empty, not ending with an assistant reply, non-string content, malformed JSON)
follow readers.py's policy: skipped and counted as `file:record: reason`, or raised.

Vocabulary. Lemur-Chat's five added tokens (its added_tokens.json: `<pad>` 32000, `<|im_start|>`
32001, `<|im_end|>` 32002, `<|im_sep|>` 32003, `<|diff_marker|>` 32004) follow the base vocabulary
in that order, so our ids are Lemur-Chat's; the model's vocabulary is then padded to a multiple
of 64 (32005 -> 32064) so every tensor-parallel size up to 64 splits it evenly.

Rows. Each dataset's examples appear `weight` times per epoch (a fraction picks a new random
subset each epoch), every epoch in a new order (seeded by seed and epoch); whole conversations are
packed in that order into rows of seq_len+1 tokens (next-fit) and the rest of a row is `<pad>`
with zero weight, so an example is never split across rows and each is seen exactly `epochs`
times. A conversation longer than a row is truncated and kept if a trainable token remains
(counted), else dropped (counted). Records are held out for evaluation by readers.held_out, the
rule of pretraining data.
"""
import collections

import numpy as np

import config
from formats import readers
from formats.readers import BadRecord
from formats.tokenizer import Tokenizer

CHAT_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|diff_marker|>")
# ChatML as encode_turns writes it, for Hugging Face's apply_chat_template (exports carry it in
# tokenizer_config.json): bos, `<|im_start|>{role}\n{content}<|im_end|>\n` per turn, and with
# add_generation_prompt the opening of the assistant's turn, which is encode_prompt
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
VOCAB_MULTIPLE = 64


# ----------------------------------------------------------------------------- ChatML

def chat_tokenizer(model_path: str) -> Tokenizer:
    """The base sentencepiece model with Lemur-Chat's added tokens (ids right after its vocab)."""
    return Tokenizer(model_path, added_tokens=CHAT_TOKENS)


def is_chat(tokenizer: Tokenizer) -> bool:
    return "<|im_start|>" in tokenizer.added and "<|im_end|>" in tokenizer.added


def padded_vocab(tokenizer: Tokenizer) -> int:
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


def encode_turns(conversations: list, tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
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


def encode_conversation(record, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of one record of any known format; raises BadRecord."""
    return encode_turns([turns(record)], tokenizer)[0]


def encode_prompt(conversation: list, tokenizer: Tokenizer, reply_start: str = "") -> list[int]:
    """Tokens that ask for the next assistant turn: the turns so far, then `<|im_start|>assistant\\n`
    and `reply_start` (the encoding of a reply of just that, less its <|im_end|>, newline and eos),
    so a reply the model continues tokenizes as it did in training."""
    tokens, _ = encode_turns([list(conversation) + [("assistant", reply_start)]], tokenizer)[0]
    return tokens[:-(2 + len(tokenizer.sp.encode("\n")))].tolist()


# ----------------------------------------------------------------------------- datasets and rows

class Dataset:
    """One source's conversations, encoded and cut to `capacity` tokens: train and held-out lists.
    skips: the readers.Skips of the run; counts: a Counter of examples, truncated and dropped."""

    def __init__(self, src: config.Source, tokenizer: Tokenizer, capacity: int, skips: readers.Skips,
                 counts: collections.Counter):
        self.name, self.weight, self.train, self.held_out = src.name, src.weight, [], []
        good = []
        for path in readers.files(src, readers.CHAT_FORMATS):
            for index, raw in readers.read(path):
                try:
                    good.append((readers.held_out(path, index, src.eval_fraction), turns(readers.parse(raw))))
                except BadRecord as e:
                    skips(f"{path}:{index + 1}", str(e))
        for i in range(0, len(good), 4096):  # one sentencepiece call per chunk
            chunk = good[i:i + 4096]
            for (held, _), (tokens, mask) in zip(chunk, encode_turns([t for _, t in chunk], tokenizer)):
                if len(tokens) > capacity:
                    tokens, mask = tokens[:capacity], mask[:capacity]
                    if not mask.any():
                        counts["dropped: too long, no trainable token within seq_len"] += 1
                        continue
                    counts["truncated to seq_len"] += 1
                (self.held_out if held else self.train).append((tokens, mask))
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
    """train.train's loader protocol (that of data.Loader) over a fixed row plan: batch k is rows
    [k B, (k+1) B) of it."""

    def __init__(self, cfg, tokenizer, datasets, rows, process_index=0, process_count=1):
        self.cfg, self.tokenizer, self.datasets, self.rows = cfg, tokenizer, datasets, rows
        self.local = cfg.batch_size // process_count
        self.first, self.batch = process_index * self.local, 0

    def _build(self, rows, examples) -> dict:
        return make_rows([[examples[d][i] for d, i in row] for row in rows], self.cfg.seq_len,
                         self.tokenizer.added["<pad>"], self.cfg.document_mask)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.batch * self.cfg.batch_size + self.first
        rows = self.rows[start:start + self.local]
        self.batch += 1
        return self._build(rows + [[]] * (self.local - len(rows)), [ds.train for ds in self.datasets])

    def state(self) -> dict:
        return {"batch": self.batch, "streams": {}}  # shaped like data.Loader's: data.merge_states joins it

    def restore(self, state: dict):
        self.batch = state["batch"]

    def ready(self):
        pass  # every conversation was read and planned before: nothing can fail later

    def eval_batches(self, n_batches: int) -> dict:
        """{dataset: up to n_batches batches} of held-out conversations, in file order, packed."""
        out, B = {}, self.cfg.batch_size
        for d, ds in enumerate(self.datasets):
            rows = _pack([(d, i) for i in range(len(ds.held_out))], lambda p: len(ds.held_out[p[1]][0]),
                         self.cfg.seq_len + 1)
            out[ds.name] = []
            for b in range(min(n_batches, -(-len(rows) // B))):
                mine = rows[b * B + self.first:b * B + self.first + self.local]
                out[ds.name].append(self._build(mine + [[]] * (self.local - len(mine)), {d: ds.held_out}))
        return out

    def close(self):
        pass
