"""The built-in data, made from this Python's standard library: the demo pretraining corpus with
its tokenizer, and the demo instruction set. Used when a config names no data (`sources=()`).

    sources, tokenizer = corpus(cache_dir(out_dir))   # code:text = 10:1, a 1024-piece BPE model
    sources = chat_sources(cache_dir(out_dir))        # stdlib questions in every chat layout

Each is built once into the cache folder next to the run folder (out/demo_data/), in a temporary
folder renamed into place with a COMPLETE marker: an interrupted build is redone, concurrent
builders never see half a corpus, and a build is deterministic for a Python version.
"""
import ast
import codecs
import io
import json
import os
import shutil
import sys
import sysconfig
import tempfile

import numpy as np
import sentencepiece as spm

from formats import storage
from config import Source

VERSION = 1  # part of the corpus folder name: bump it when the demo corpus changes
PYTHON = f"py{sys.version_info[0]}{sys.version_info[1]}"


def cache_dir(out_dir: str) -> str:
    """Where a run in out_dir keeps the demo data: beside it, shared by runs (out/demo_data); for an
    out_dir in a bucket, on local disk (~/.cache/lemur-jax/demo_data): it is rebuilt in seconds."""
    if storage.is_remote(out_dir):
        return os.path.join(os.path.expanduser("~"), ".cache", "lemur-jax", "demo_data")
    return os.path.join(os.path.dirname(os.path.abspath(out_dir)), "demo_data")


def _build_once(final: str, write) -> str:
    """`final`, made by write(folder) into a temporary folder beside it and renamed into place
    with a COMPLETE marker, unless it is already complete."""
    if os.path.isfile(os.path.join(final, "COMPLETE")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".building-")
    write(tmp)
    open(os.path.join(tmp, "COMPLETE"), "w").close()
    if not os.path.isfile(os.path.join(final, "COMPLETE")):
        shutil.rmtree(final, ignore_errors=True)  # leftovers of an interrupted build
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its files are identical
        shutil.rmtree(tmp)
    return final


# ----------------------------------------------------------------------------- pretraining corpus

# Directories of the standard library left out of the demo code: tests, vendored or generated code,
# GUI demos, and deprecated packages; what remains is ~8 MB of ordinary Python.
_SKIP_DIRS = {"site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data",
              "encodings", "distutils", "__pycache__"}


def _docstrings(node, name: str):
    """The docstrings of a module and of the classes and functions defined at its top levels."""
    if ast.get_docstring(node):
        yield f"{name}\n{ast.get_docstring(node)}"
    for child in node.body:
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, child.name)


def _stdlib_documents():
    """Code: the standard library's .py files. Prose: its docstrings (one document per module),
    the pydoc topics (the language reference Python ships), LICENSE.txt and the Zen of Python."""
    from pydoc_data.topics import topics
    root = sysconfig.get_paths()["stdlib"]
    code, prose = [], [{"title": k, "text": topics[k]} for k in sorted(topics)]
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("test", "config-")))
        for name in sorted(n for n in names if n.endswith(".py") and not n.startswith("test")):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            with open(os.path.join(dirpath, name), "rb") as f:
                source = f.read().decode("utf-8", "replace")
            if not source.strip():  # empty __init__.py files
                continue
            code.append({"path": rel, "content": source})
            tree = ast.parse(source)
            docs = list(_docstrings(tree, rel))
            if docs:
                prose.append({"title": rel, "text": "\n\n".join(docs)})
            if rel == "this.py":  # the Zen of Python, stored rot13-encoded
                zen = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "s")
                prose.append({"title": "zen", "text": codecs.decode(zen, "rot13")})
    if os.path.isfile(os.path.join(root, "LICENSE.txt")):
        with open(os.path.join(root, "LICENSE.txt"), encoding="utf-8") as f:
            prose.append({"title": "LICENSE.txt", "text": f.read()})
    return code, prose


def corpus(cache: str, vocab_size: int = 1024) -> tuple[tuple[Source, ...], str]:
    """The demo corpus (code:text = 10:1 by tokens, as Lemur; 5% held out) and a byte-fallback BPE
    tokenizer trained on it, in {cache}/demo{VERSION}-py{X}{Y}-v{vocab_size}/: code.jsonl (field
    "content"), text.jsonl, tokenizer.model."""
    def write(folder):
        code, prose = _stdlib_documents()
        for name, docs in (("code", code), ("text", prose)):  # shuffled: one file is read in order
            with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(docs[i]) + "\n" for i in np.random.default_rng(0).permutation(len(docs)))
        lines = [line for d in code for line in d["content"].splitlines() if line.strip()]
        lines += [line for d in prose for line in d["text"].splitlines() if line.strip()]
        model = io.BytesIO()
        # identity normalisation and kept whitespace so code round-trips; no paths go into the model
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, input_sentence_size=0,
            shuffle_input_sentence=False, num_threads=1, pad_id=-1, minloglevel=2)
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(model.getvalue())

    final = _build_once(os.path.join(cache, f"demo{VERSION}-{PYTHON}-v{vocab_size}"), write)
    sources = (Source("code", (os.path.join(final, "code.jsonl"),), 10.0, field="content", eval_fraction=0.05),
               Source("text", (os.path.join(final, "text.jsonl"),), 1.0, eval_fraction=0.05))
    return sources, os.path.join(final, "tokenizer.model")


# ----------------------------------------------------------------------------- instruction set

def chat_sources(cache: str) -> tuple[Source, Source]:
    """Questions about the standard library's public functions, answered by their docstrings'
    summary lines and their signatures, in all four chat layouts: {cache}/chat-py{X}{Y}/docs.jsonl
    and signatures.json, 5% held out."""
    def write(folder):
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
        with open(os.path.join(folder, "docs.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in docs)
        with open(os.path.join(folder, "signatures.json"), "w") as f:
            json.dump(signatures, f, indent=1)

    final = _build_once(os.path.join(cache, f"chat-{PYTHON}"), write)
    return (Source("docs", (os.path.join(final, "docs.jsonl"),), 1.0, eval_fraction=0.05),
            Source("signatures", (os.path.join(final, "signatures.json"),), 1.0, eval_fraction=0.05))
