"""data.py, readers.py, tokenizer.py and demo.py: mixture shares, packing, resumption, multi-process
equivalence, formats, bad input, the demo corpus."""
import filecmp
import gzip
import io
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import sentencepiece as spm
from conftest import subprocess_env

import config
import data
from config import Source
from data import Loader
from formats import demo, readers
from formats.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST, SECOND = "abcdefghijklm", "nopqrstuvwxyz"  # each source writes with its own letters


def words(rng, letters, n):
    return " ".join("".join(rng.choice(list(letters), rng.integers(2, 7))) for _ in range(n))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A tiny BPE model trained on generated text of both alphabets."""
    rng = np.random.default_rng(0)
    lines = [words(rng, FIRST + SECOND + "0123456789#", 12) for _ in range(2000)]
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   vocab_size=300, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, pad_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return str(path)


def write_jsonl(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return str(path)


def corpus(tmp_path, files=(4, 1), docs=40, long_words=(30, 30)):
    """Two sources: 'first' in files[0] files, 'second' in files[1]; every document starts with #id#."""
    rng, sources = np.random.default_rng(1), []
    for (k, name, letters, n_files, n_words) in ((1, "first", FIRST, files[0], long_words[0]),
                                                  (2, "second", SECOND, files[1], long_words[1])):
        for f in range(n_files):  # ids in digits, so that a row's letters tell its source
            texts = [f"#{k}{f:02d}{d:03d}# " + words(rng, letters, n_words) for d in range(docs)]
            write_jsonl(tmp_path / name / f"{f:03d}.jsonl", texts)
        sources.append(Source(name, (str(tmp_path / name / "*.jsonl"),), 1.0, eval_fraction=0.1))
    return sources


def take(loader, n):
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches


def test_shares_match_weights_with_100x_longer_documents(tmp_path, tok_path):
    first, second = corpus(tmp_path, docs=20, long_words=(1000, 10))
    sources = [Source("first", first.paths, 3.0), Source("second", second.paths, 1.0)]
    loader = Loader(sources, Tokenizer(tok_path), seq_len=32, batch_size=8, num_streams=4)
    tok, rows = loader.tokenizer, np.concatenate([b["tokens"] for b in take(loader, 250)])
    # which source a row came from, read from its letters rather than from the loader
    texts = [tok.decode(r) for r in rows]
    from_second = np.mean([bool(set(t) & set(SECOND)) and not set(t) & set(FIRST) for t in texts])
    assert len(rows) == 2000 and abs(from_second - 0.25) < 0.005
    assert abs(loader.shares()["second"] - 0.25) < 0.005


def test_packing_and_segment_ids(tmp_path, tok_path):
    tok = Tokenizer(tok_path)
    rng = np.random.default_rng(2)
    texts = [words(rng, FIRST, int(rng.integers(1, 40))) for _ in range(60)]
    src = Source("only", (write_jsonl(tmp_path / "a.jsonl", texts),), 1.0, eval_fraction=0.0)
    loader = Loader([src], tok, seq_len=16, batch_size=2, num_streams=1, document_mask=True)
    batches = take(loader, 20)
    stream = np.concatenate([[tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts])
    doc_of = np.concatenate([[d] * (len(tok.encode(t)) + 2) for d, t in enumerate(texts)])
    rows = np.concatenate([b["tokens"] for b in batches])
    segs = np.concatenate([b["segment_ids"] for b in batches])
    assert rows.dtype == segs.dtype == np.int32 and rows.shape == segs.shape == (40, 17)
    np.testing.assert_array_equal(rows.ravel(), stream[:rows.size])  # no padding, tails carried
    expected = doc_of[:rows.size].reshape(rows.shape)
    np.testing.assert_array_equal(segs, expected - expected[:, :1])


def check_restore_mid_file(tmp_path, tok_path):
    """A loader restored from the state after 7 batches (mid-file, mid-document) yields exactly the
    next 100 batches of the loader that kept going."""
    sources = corpus(tmp_path, files=(4, 1), docs=10)
    tok = Tokenizer(tok_path)
    loader = Loader(sources, tok, seq_len=24, batch_size=4, num_streams=2, document_mask=True)
    take_first = [next(loader) for _ in range(7)]
    state = json.loads(json.dumps(loader.state()))
    assert any(pos[2] > 0 and pos[3] > 0 for s in state["streams"].values() for pos in s.values())  # mid-file, mid-doc
    expected = take(loader, 100)  # runs through several epochs of both sources
    resumed = take(Loader(sources, tok, seq_len=24, batch_size=4, num_streams=2, document_mask=True, state=state), 100)
    assert not np.array_equal(take_first[0]["tokens"], expected[0]["tokens"])
    for a, b in zip(expected, resumed):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])


def test_restore_mid_file_continues_identically(tmp_path, tok_path):
    check_restore_mid_file(tmp_path, tok_path)


def test_restore_check_catches_a_lost_token_offset(tmp_path, tok_path, monkeypatch):
    """Guard: a position that forgets how far into its document it was (the token offset) restarts
    the document on restore; the check above sees it."""
    state = data._Packer.state
    monkeypatch.setattr(data._Packer, "state", lambda self: [*state(self)[:3], 0])
    with pytest.raises(AssertionError):
        check_restore_mid_file(tmp_path, tok_path)


@pytest.mark.parametrize("files", [(8, 1), (3, 2)])  # whole files per stream, and lines per stream
def test_processes_produce_the_same_global_batches(tmp_path, tok_path, files):
    sources, tok = corpus(tmp_path, files=files, docs=40), Tokenizer(tok_path)

    def run(count, state=None, n=30):
        loaders = [Loader(sources, tok, 16, 8, seed=3, num_streams=4, process_index=i, process_count=count,
                          state=state) for i in range(count)]
        batches = [np.concatenate([next(l)["tokens"] for l in loaders]) for _ in range(n)]
        evals = [np.concatenate([l.eval_batches(2)[s.name][k]["tokens"] for l in loaders])
                 for s in sources for k in range(2)]
        states = [l.state() for l in loaders]
        for l in loaders:
            l.close()
        return np.stack(batches), np.stack(evals), data.merge_states(states)

    single, single_eval, _ = run(1)
    for count in (2, 4):
        batches, evals, _ = run(count)
        np.testing.assert_array_equal(batches, single)
        np.testing.assert_array_equal(evals, single_eval)
    state = run(4, n=10)[2]  # four processes' states, merged, resume on one and on two processes
    np.testing.assert_array_equal(run(1, state, n=20)[0], single[10:])
    np.testing.assert_array_equal(run(2, state, n=20)[0], single[10:])


def test_held_out_documents_are_never_trained_on(tmp_path, tok_path):
    sources, tok = corpus(tmp_path, files=(2, 1), docs=60), Tokenizer(tok_path)
    loader = Loader(sources, tok, seq_len=64, batch_size=4, num_streams=2)
    ids = lambda rows: set(re.findall(r"#(\d+)#", "".join(tok.decode(r) for r in rows)))
    evals = loader.eval_batches(2)
    train = ids(np.concatenate([next(loader)["tokens"] for _ in range(150)]))  # > 1 epoch
    assert set(evals) == {"first", "second"} and all(len(v) == 2 for v in evals.values())
    held = ids(np.concatenate([b["tokens"] for v in evals.values() for b in v]))
    assert held and len(train) > 100 and not train & held
    again = loader.eval_batches(2)
    loader.close()
    for name in evals:
        for a, b in zip(evals[name], again[name]):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_added_tokens_round_trip(tok_path):
    base = Tokenizer(tok_path)
    tok = Tokenizer(tok_path, added_tokens=("<|im_start|>", "<|im_end|>", "<|im"))
    n = base.vocab_size
    assert tok.vocab_size == n + 3
    text = "<|im_start|>user\nabc def<|im_end|>\n<|im_start|>assistant\nno<|im"
    ids = tok.encode(text)
    assert [i for i in ids if i >= n] == [n, n + 1, n, n + 2]
    assert ids[:1] == [n] and ids[1:-1] != [] and tok.decode(ids) == text
    assert tok.encode("abc def") == base.encode("abc def")


def write_format(path, texts):
    """Two documents in the format named by the extension (field "content")."""
    body = "".join(json.dumps({"content": t}) + "\n" for t in texts)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(body.encode()))
    elif path.suffix == ".zst":
        path.write_bytes(pytest.importorskip("zstandard").ZstdCompressor().compress(body.encode()))
    elif path.suffix == ".parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"content": texts}), path)
    else:  # .txt: one document per file
        for i, t in enumerate(texts):
            path.with_name(f"{i}{path.name}").write_text(t)
        return str(path.with_name(f"*{path.name}"))
    return str(path)


@pytest.mark.parametrize("ext", [".jsonl.gz", ".jsonl.zst", ".parquet", ".txt"])
def test_formats(tmp_path, tok_path, ext):
    texts = [f"#{i}# " + words(np.random.default_rng(i), FIRST, 20) for i in range(2)]
    path = write_format(tmp_path / f"a{ext}", texts)
    tok = Tokenizer(tok_path)
    loader = Loader([Source("s", (path,), 1.0, field="content", eval_fraction=0.0)], tok, 32, 2, num_streams=1)
    rows = np.concatenate([b["tokens"] for b in take(loader, 5)])
    assert set(re.findall(r"#(\d+)#", "".join(tok.decode(r) for r in rows))) == {"0", "1"}
    assert loader.skipped() == {}


GOOD = json.dumps({"text": "abc def ghi jkl"}) + "\n"
BAD_RECORDS = {
    "malformed JSON": b'{"text": "abc\n',
    "no field 'text'": b'{"body": "abc"}\n',
    "field 'text' is not a string": b'{"text": 5}\n',
    "empty document": b'{"text": "  "}\n',
    "invalid UTF-8": b'{"text": "abc \xff\xfe"}\n',
}


@pytest.mark.parametrize("reason", [*BAD_RECORDS, "unreadable"])
def test_bad_records_are_counted_or_raised(tmp_path, tok_path, reason):
    if reason == "unreadable":  # a gzip file cut short in its fourth line
        path = tmp_path / "a.jsonl.gz"
        lines = [json.dumps({"text": words(np.random.default_rng(i), FIRST, 200)}) + "\n" for i in range(4)]
        cut = len(gzip.compress("".join(lines[:3]).encode()))  # compressed size of lines 1-3, about
        path.write_bytes(gzip.compress("".join(lines).encode())[:cut])
    else:
        path = tmp_path / "a.jsonl"
        path.write_bytes((GOOD * 3).encode() + BAD_RECORDS[reason] + (GOOD * 3).encode())
    src = Source("s", (str(path),), 1.0, eval_fraction=0.0)
    loader = Loader([src], Tokenizer(tok_path), 16, 2, num_streams=1)
    take(loader, 100)  # more than the file holds
    counts = loader.skipped()
    assert counts and all(k.startswith(reason) for k in counts)
    loader = Loader([src], Tokenizer(tok_path), 16, 2, num_streams=1, bad_records="raise")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ":4: "):
        take(loader, 100)


def test_configuration_errors(tmp_path, tok_path):
    good = write_jsonl(tmp_path / "a.jsonl", ["abc"])
    tok = Tokenizer(tok_path)
    (tmp_path / "dir.jsonl").mkdir()  # matches the glob but cannot be read (chmod does not stop root)
    cases = [(Source("s", (str(tmp_path / "none*.jsonl"),), 1.0), "matches no files"),
             (Source("s", (str(tmp_path / "dir.jsonl"),), 1.0), "cannot read")]
    for src, message in cases:
        with pytest.raises((ValueError, OSError), match=message):
            Loader([src], tok, 16, 2)
    for weight in (-1.0, float("nan"), float("inf")):  # NaN or inf would give every row to one source
        with pytest.raises(ValueError, match="source 's': weight must be a finite number >= 0"):
            Source("s", (good,), weight)
    with pytest.raises(ValueError, match="all have weight 0"):  # weight 0 alone: evaluated, never trained on
        Loader([Source("s", (good,), 0.0)], tok, 16, 2)
    with pytest.raises(TypeError, match="paths must be a tuple"):
        Source("s", good, 1.0)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by 4 processes"):  # checked where it enters
        config.validate(config.TrainConfig(batch_size=6), process_count=4)


def test_optional_formats_name_the_missing_package(tmp_path, tok_path, monkeypatch):
    for module in ("zstandard", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    for name, package in (("a.jsonl.zst", "zstandard"), ("a.parquet", "pyarrow")):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ImportError, match=f"install {package} to read .*{name}"):
            Loader([Source("s", (str(tmp_path / name),), 1.0)], Tokenizer(tok_path), 16, 2)


def test_demo_corpus_is_deterministic_and_cached(tmp_path, runs_dir):
    """A second build (over the leftovers of an interrupted one: no COMPLETE marker, a broken
    tokenizer) gives files identical to the test run's build, which is reused, not rebuilt."""
    built = demo.cache_dir(str(runs_dir / "run"))
    interrupted = tmp_path / f"demo{demo.VERSION}-{demo.PYTHON}-v1024"
    interrupted.mkdir(parents=True)
    (interrupted / "tokenizer.model").write_bytes(b"half a model")
    stamp = os.stat(demo.corpus(built)[1]).st_mtime_ns
    sources, tokenizer = demo.corpus(built)
    other_sources, other_tokenizer = demo.corpus(str(tmp_path))
    assert os.path.dirname(other_tokenizer) == str(interrupted)
    for a, b in [(tokenizer, other_tokenizer)] + [(s.paths[0], o.paths[0]) for s, o in zip(sources, other_sources)]:
        assert os.path.getsize(a) > 10_000 and filecmp.cmp(a, b, shallow=False)
    assert [s.weight for s in sources] == [10.0, 1.0] and Tokenizer(tokenizer).vocab_size == 1024
    assert os.stat(tokenizer).st_mtime_ns == stamp  # reused, not rebuilt


def test_cli_prints_shares(tmp_path, tok_path):
    sources = corpus(tmp_path, files=(2, 1))
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"from config import Source, TrainConfig\n"
                   f"config = TrainConfig(sources={tuple(sources)!r}, tokenizer={tok_path!r}, seq_len=32, batch_size=4)\n")
    out = subprocess.run([sys.executable, "data.py", str(cfg), "--batches", "20", "--seed=1"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=subprocess_env()).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["shares"] == {"first": 0.5, "second": 0.5} and report["tokens_per_sec"] > 0


def test_benchmark_smoke(runs_dir):
    out = subprocess.run([sys.executable, "bench/data.py", "--smoke", "--cache", demo.cache_dir(str(runs_dir / "run"))],
                         cwd=ROOT, capture_output=True, text=True, check=True, env=subprocess_env()).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["loader_tokens_per_sec"] > 0 and report["sentencepiece_tokens_per_sec"] > 0 and report["ratio"] > 0


def test_a_source_without_documents_says_why(tmp_path, tok_path):
    """An empty file is not advised to use fewer streams; too few documents for the streams is."""
    tok = Tokenizer(tok_path)
    (tmp_path / "empty.jsonl").write_text("")
    loader = Loader([Source("s", (str(tmp_path / "empty.jsonl"),), 1.0)], tok, 16, 2, num_streams=1)
    with pytest.raises(data.NoDocuments, match=r"source 's' found no training records in .*empty.jsonl"):
        next(loader)
    loader.close()
    few = write_jsonl(tmp_path / "few.jsonl", ["abc def", "ghi jkl"])
    loader = Loader([Source("s", (few,), 1.0, eval_fraction=0.0)], tok, 16, 4, num_streams=4)
    with pytest.raises(data.NoDocuments, match="holds? 2 training records, fewer than the 4 streams"):
        next(loader)
    loader.close()


def test_sources_with_nothing_held_out_are_not_evaluated(tmp_path, tok_path, caplog):
    """No eval loss stands in for nothing evaluated: eval_fraction=0, or held-out records that are
    not there, leave the source out of eval_batches (with a warning for the second)."""
    tok = Tokenizer(tok_path)
    texts = [words(np.random.default_rng(i), FIRST, 30) for i in range(4)]
    held = [i for i in range(4) if readers.held_out("few.jsonl", i, 0.05)]
    assert not held  # 4 records, none of them held out at 5%
    sources = [Source("none", (write_jsonl(tmp_path / "a" / "some.jsonl", texts),), 1.0, eval_fraction=0.0),
               Source("few", (write_jsonl(tmp_path / "few.jsonl", texts),), 1.0, eval_fraction=0.05),
               Source("all", (write_jsonl(tmp_path / "b" / "some.jsonl", texts),), 1.0, eval_fraction=0.99)]
    loader = Loader(sources, tok, 16, 2, num_streams=1)
    with caplog.at_level(logging.WARNING, logger="data"):
        evals = loader.eval_batches(1)
    loader.close()
    assert list(evals) == ["all"] and "source 'few' found no held-out records" in caplog.text


def test_an_unreadable_folder_is_named(tmp_path):
    """A glob matches nothing in a folder we may not list: say so, not just "matches no files"."""
    root = tempfile.mkdtemp()  # not under pytest's tmp_path, whose parents only root may enter
    try:
        os.chmod(root, 0o755)
        os.makedirs(os.path.join(root, "secret"))
        write_jsonl(pathlib.Path(root) / "secret" / "a.jsonl", ["abc"])
        os.chmod(os.path.join(root, "secret"), 0o000 if os.geteuid() else 0o700)
        src = Source("s", (os.path.join(root, "secret", "*.jsonl"),), 1.0)
        if os.geteuid() == 0:
            os.seteuid(65534)  # as root no permission applies: look as nobody
        try:
            with pytest.raises(FileNotFoundError, match=f"the folder {root}/secret cannot be read: permission denied"):
                readers.files(src)
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
    finally:
        os.chmod(os.path.join(root, "secret"), 0o700)
        shutil.rmtree(root)
