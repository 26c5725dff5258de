"""chat.py and sft.py: chat formats and masks, bad records, packing, epochs, the vocabulary resize,
a short run."""
import collections
import dataclasses
import gzip
import io
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

import chat
import config
import data
import decode
import model
import sharding
import sft
from formats import checkpoint, readers
from formats.weights import for_serving

WORDS = "the a function returns list of values when called with python code reads file writes data".split()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A small BPE model (byte fallback, newlines never merged, as Llama's) trained on generated text."""
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) + f" {i} `x.y()`" for i in range(2000)]
    path = tmp_path_factory.mktemp("spm") / "tok.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=400,
                                   byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   num_threads=1, pad_id=-1, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def tok(tok_path):
    return chat.chat_tokenizer(tok_path)


def chatml(turns):
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


FORMATS = {
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi there"},
                                    {"from": "gpt", "value": "hello 1"}, {"from": "human", "value": " reads file?"},
                                    {"from": "gpt", "value": "it returns\n  data <|im_start|>"}]},
                 [("system", "Be brief."), ("user", "hi there"), ("assistant", "hello 1"), ("user", " reads file?"),
                  ("assistant", "it returns\n  data <|im_start|>")]),
    "openai": ({"messages": [{"role": "user", "content": "what is x.y()"}, {"role": "assistant", "content": "a list"}]},
               [("user", "what is x.y()"), ("assistant", "a list")]),
    "alpaca": ({"instruction": "write code", "input": "", "output": "python code"},
               [("user", "write code"), ("assistant", "python code")]),
    "alpaca_input": ({"instruction": "explain", "input": "x.y()", "output": "reads a file"},
                     [("user", "explain\n\nx.y()"), ("assistant", "reads a file")]),
    "orca": ({"system_prompt": "You are python.", "question": "when?", "response": "when called"},
             [("system", "You are python."), ("user", "when?"), ("assistant", "when called")]),
    "orca_no_system": ({"system_prompt": "", "question": "q", "response": "r"}, [("user", "q"), ("assistant", "r")]),
}


@pytest.mark.parametrize("name", FORMATS)
def test_encode_every_format(tok, name):
    record, turns = FORMATS[name]
    tokens, mask = chat.encode_conversation(record, tok)
    assert tokens.shape == mask.shape and tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert tok.decode(tokens) == chatml(turns)  # exactly ChatML (bos and eos decode to nothing)
    replies = "".join(content + "<|im_end|>" for role, content in turns if role == "assistant")
    assert tok.decode(tokens[mask == 1]) == replies
    assert (tokens[mask == 1] == tok.added["<|im_end|>"]).sum() == sum(r == "assistant" for r, _ in turns)
    assert (tokens == tok.added["<|im_start|>"]).sum() == len(turns)  # text in a reply stays text


def test_encode_prompt_is_chatml_and_a_prefix_of_training(tok):
    """The prompt is the ChatML text of the turns so far plus an open assistant header, encoded as a
    Hugging Face tokenizer with added tokens does (tok.encode cuts the special tokens out of the
    text); a trained conversation continues it with the reply."""
    turns = FORMATS["sharegpt"][1]
    prompt = chat.encode_prompt(turns[:-1], tok)
    assert prompt == [tok.bos_id] + tok.encode(chatml(turns[:-1]) + "<|im_start|>assistant\n")
    tokens, mask = chat.encode_turns([turns], tok)[0]
    assert tokens[:len(prompt)].tolist() == prompt and mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0


BAD = [
    ({"text": "plain"}, "no known format"),
    ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, "unknown role 'robot'"),
    ({"messages": []}, "empty conversation"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}, {"from": "human", "value": "z"}]},
     "does not end with an assistant turn"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}, "non-string content"),
    ({"instruction": "x", "input": "", "output": 3}, "non-string content"),
]


def test_bad_records_skipped_and_counted_or_raised(tok, tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r, _ in BAD] + ["{not json", json.dumps(FORMATS["alpaca"][0])]
    path.write_text("\n".join(lines) + "\n")
    counts, skips = collections.Counter(), readers.Skips("skip")
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = chat.Dataset(config.Source("m", (str(path),), 1.0, eval_fraction=0.0), tok, 256, skips, counts)
    assert len(ds.train) == 1 and counts["examples"] == 1
    reasons = [r for _, r in BAD] + ["malformed JSON"]
    for i, reason in enumerate(reasons, 1):
        assert sum(v for k, v in skips.counts.items() if reason in k) == reasons.count(reason)
        assert f"{path}:{i}: " in caplog.text
    with pytest.raises(readers.BadRecord, match=f"{path}:1: no known format"):
        chat.Dataset(config.Source("m", (str(path),), 1.0), tok, 256, readers.Skips("raise"), collections.Counter())


def test_long_conversations_truncated_or_dropped(tok, tmp_path):
    path = tmp_path / "long.json"
    long_question = " ".join(WORDS * 4)
    path.write_text(json.dumps([{"instruction": "write code", "input": "", "output": long_question},  # truncated reply
                                {"instruction": long_question, "input": "", "output": "ok"}]))  # no reply fits
    counts = collections.Counter()
    ds = chat.Dataset(config.Source("l", (str(path),), 1.0, eval_fraction=0.0), tok, 40, readers.Skips("skip"), counts)
    assert counts["truncated to seq_len"] == 1 and counts["dropped: too long, no trainable token within seq_len"] == 1
    assert len(ds.train) == 1 and len(ds.train[0][0]) == 40 and ds.train[0][1].any()


def unique_examples(tmp_path, n, name="u"):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q {i}", "input": "", "output": f"{name} {i}"}) + "\n"
                            for i in range(n)))
    return config.Source(name, (str(path),), 1.0, eval_fraction=0.0)


def seen(tok, batch):
    """The replies of every conversation in a batch, by segment (document_mask rows)."""
    out = []
    for tokens, weights, seg in zip(batch["tokens"], batch["weights"], batch["segment_ids"]):
        for s in set(seg[1:].tolist()) - {0}:
            targets = tokens[1:][(seg[1:] == s) & (weights > 0)]
            out.append(tok.decode(targets).replace("<|im_end|>", ""))
    return out


def test_two_epochs_see_each_example_exactly_twice(tok, tmp_path):
    src = unique_examples(tmp_path, 37)
    ds = [chat.Dataset(src, tok, 65, readers.Skips("skip"), collections.Counter())]
    rows = chat.plan_rows(ds, 2, seed=0, capacity=65)
    cfg = sft.SFTConfig(batch_size=4, seq_len=64)
    loaders = [chat.ChatLoader(cfg, tok, ds, rows, i, 2) for i in range(2)]  # two processes: one global batch
    steps = -(-len(rows) // 4)
    order = []
    for _ in range(steps):
        order += [r for loader in loaders for r in seen(tok, next(loader))]
    assert collections.Counter(order) == {f"u {i}": 2 for i in range(37)}
    first = [r for i, r in enumerate(order) if r not in order[:i]]
    assert order[:37] == first and order[37:] != first  # epoch 1 is all examples; epoch 2 another order
    # resume: a loader restored from the merged position of both processes continues identically
    pair = [chat.ChatLoader(cfg, tok, ds, rows, i, 2) for i in range(2)]
    for loader in pair:
        next(loader), next(loader)
    resumed = chat.ChatLoader(cfg, tok, ds, rows, 1, 2)
    resumed.restore(json.loads(json.dumps(data.merge_states([l.state() for l in pair]))))
    expected, got = next(pair[1]), next(resumed)
    assert all((expected[k] == got[k]).all() for k in expected)


def test_weights_repeat_examples_per_epoch(tok, tmp_path):
    srcs = [dataclasses.replace(unique_examples(tmp_path, 10, "a"), weight=2.0),
            dataclasses.replace(unique_examples(tmp_path, 10, "b"), weight=0.5)]
    ds = [chat.Dataset(s, tok, 65, readers.Skips("skip"), collections.Counter()) for s in srcs]
    picks = collections.Counter(p for row in chat.plan_rows(ds, 2, seed=0, capacity=65) for p in row)
    assert all(picks[0, i] == 4 for i in range(10))  # twice per epoch
    assert sum(picks[1, i] for i in range(10)) == 10 and max(picks[1, i] for i in range(10)) <= 2  # half per epoch


def packed_batch(tok, tmp_path, document_mask=True):
    examples = [chat.encode_conversation(r, tok) for r, _ in FORMATS.values()]
    return chat.make_rows([examples[:3], examples[3:]], 255, tok.added["<pad>"], document_mask), examples


def test_packed_rows_never_leak_loss_across_conversations(tok, tmp_path):
    batch, examples = packed_batch(tok, tmp_path)
    seg, w = batch["segment_ids"], batch["weights"]
    for r, row in enumerate([examples[:3], examples[3:]]):
        at = 0
        for tokens, mask in row:
            assert (w[r, at:at + len(tokens) - 1] == mask[1:]).all()  # its targets carry its own mask
            at += len(tokens)
            assert w[r, at - 1] == 0  # its eos -> the next conversation's bos (or a pad): never trained
        assert (w[r, at:] == 0).all() and (seg[r, at:] == 0).all()  # padding
    assert (w[seg[:, 1:] != seg[:, :-1]] == 0).all()
    # with document masking a packed row computes exactly what each conversation computes alone
    cfg = model.Config(vocab_size=chat.padded_vocab(tok), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                       max_seq_len=256, dtype="float32")
    params = model.init_params(cfg, jax.random.key(0))
    alone = chat.make_rows([[e] for e in examples[:3]], 255, tok.added["<pad>"], True)  # one per row
    tokens = np.concatenate([batch["tokens"], alone["tokens"]])[:, :-1]
    logits = jax.jit(model.forward, static_argnums=2)(params, tokens, cfg, np.concatenate([seg, alone["segment_ids"]])[:, :-1])
    at = 0
    for i, (t, _) in enumerate(examples[:3]):
        np.testing.assert_allclose(logits[0, at:at + len(t)], logits[2 + i, :len(t)], atol=2e-5)
        at += len(t)


def test_masked_tokens_get_zero_gradient(tok, tmp_path):
    batch, _ = packed_batch(tok, tmp_path, document_mask=False)
    V = chat.padded_vocab(tok)
    logits = jax.random.normal(jax.random.key(0), (*batch["weights"].shape, V))
    loss = lambda l: model.cross_entropy(l, jnp.asarray(batch["tokens"][:, 1:]), jnp.asarray(batch["weights"]))[0]
    grad_norm = jnp.abs(jax.jit(jax.grad(loss))(logits)).sum(-1)
    assert (grad_norm[batch["weights"] == 0] == 0).all() and (grad_norm[batch["weights"] > 0] > 0).all()


def test_resize_vocab_keeps_old_rows_and_starts_new_ones_at_the_mean():
    embed, output = jax.random.normal(jax.random.key(0), (40, 8)), jax.random.normal(jax.random.key(1), (8, 40))
    new_embed, new_output = sft.resize_vocab(embed, output, 64)
    assert new_embed.shape == (64, 8) and new_output.shape == (8, 64)
    assert (new_embed[:40] == embed).all() and (new_output[:, :40] == output).all()
    np.testing.assert_allclose(new_embed[40:], np.broadcast_to(embed.mean(0), (24, 8)), rtol=1e-6)
    np.testing.assert_allclose(new_output[:, 40:], np.broadcast_to(output.mean(1)[:, None], (8, 24)), rtol=1e-6)


def test_short_run_from_a_checkpoint_then_sample(tok, tok_path, tmp_path, monkeypatch):
    """sft.run through train.train: base checkpoint -> grown vocab -> 2 epochs -> it chats (decode.py)."""
    base_cfg = model.Config(vocab_size=tok.sp.get_piece_size(), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=64, max_seq_len=64, dtype="float32")
    monkeypatch.setitem(model.PRESETS, "mini", base_cfg)
    params = model.init_params(base_cfg, jax.random.key(0))
    (tmp_path / "base").mkdir()
    checkpoint.save(str(tmp_path / "base"), 7, {"params": params}, {}, {"model": dataclasses.asdict(base_cfg)}, 1)
    tcfg = sft.SFTConfig(out_dir=str(tmp_path / "chat"), model="mini", init_from=f"ckpt:{tmp_path / 'base'}",
                         tokenizer=tok_path,
                         sources=(unique_examples(tmp_path, 40),), batch_size=8, seq_len=32, mesh=(1, 4, 2),
                         lr=1e-3, log_every=1, eval_every=100, checkpoint_every=100)
    state = sft.run(tcfg)
    steps = checkpoint.committed(tcfg.out_dir)[-1]
    assert int(state["step"]) == steps and steps == -(-len(sft.prepare(tcfg)[4]) // 8)
    grown = state["params"]
    assert grown["embed"].shape[0] == chat.padded_vocab(tok) == grown["output"].shape[1]
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    p, cfg, chat_tok = for_serving(tcfg.out_dir, mesh)
    assert cfg.vocab_size == chat.padded_vocab(tok) and chat_tok.added == tok.added
    out = decode.generate(p, cfg, mesh, [chat.encode_prompt([("user", "q 1")], chat_tok)], 5,
                          vocab_size=chat_tok.vocab_size)[0]
    assert len(out) == 5 and max(out) < chat_tok.vocab_size


@pytest.mark.parametrize("ext", [".jsonl.gz", ".parquet", ".json"])
def test_chat_records_from_any_format_with_the_shared_held_out_rule(tok, tmp_path, ext):
    """Chat data goes through readers.py like pretraining data: its formats, and its held-out rule
    (readers.held_out of the file and the 0-based record number)."""
    rows = [{"instruction": f"q {i}", "input": "", "output": f"a {i}"} for i in range(40)]
    path = tmp_path / f"chat{ext}"
    if ext == ".parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    ds = chat.Dataset(config.Source("f", (str(path),), 1.0, eval_fraction=0.3), tok, 256, readers.Skips("raise"),
                      collections.Counter())
    held = [i for i in range(40) if readers.held_out(str(path), i, 0.3)]
    assert 0 < len(held) < 40 and len(ds.train) == 40 - len(held)
    replies = [tok.decode(t[m == 1]).replace("<|im_end|>", "") for t, m in ds.held_out]
    assert replies == [f"a {i}" for i in held]


def test_a_truncated_json_file_is_named(tok, tmp_path):
    """A .json array cut short: skipped and counted under "skip", an error naming the file under "raise"
    (not a bare JSONDecodeError)."""
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}] * 3)[:-20])
    skips = readers.Skips("skip")
    ds = chat.Dataset(config.Source("c", (str(path),), 1.0), tok, 256, skips, collections.Counter())
    assert ds.train == [] and [r for r in skips.counts if r.startswith("unreadable from here on (JSONDecodeError")]
    with pytest.raises(readers.BadRecord, match=f"{path}:1: unreadable from here on"):
        chat.Dataset(config.Source("c", (str(path),), 1.0), tok, 256, readers.Skips("raise"), collections.Counter())


def test_an_export_formats_chats_exactly_as_we_trained(tok, tmp_path):
    """transformers' AutoTokenizer reads an export's tokenizer files (tokenizer_config.json with
    the ChatML template): apply_chat_template(..., add_generation_prompt=True) gives our prompt
    ids for multi-turn conversations with a system message, and plain text encodes alike."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers converts tokenizer.model with protobuf")
    tok.save(str(tmp_path), chat.CHAT_TEMPLATE)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    conversations = [
        [("system", "You answer with python code."), ("user", "the list of values 12"),
         ("assistant", "a function returns `x.y()` when called"), ("user", "writes data\nreads file 7")],
        [("user", "python code 3")],
        [("system", "Be brief."), ("user", "list\n\nof values"), ("assistant", "the data"), ("user", "a file")],
    ]
    for conversation in conversations:
        messages = [{"role": role, "content": content} for role, content in conversation]
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == chat.encode_prompt(conversation, tok), conversation
    text = "a function returns 42\nwhen called"
    assert theirs.encode(text) == [tok.bos_id] + tok.encode(text)
    assert theirs.decode(tok.encode(text)) == text
