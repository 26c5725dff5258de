"""The confined side of evaluation/sandbox.py: the process that runs model-written code.

sandbox.py starts it as `python -I evaluation/sandbox_child.py SETTINGS_JSON` (inside bwrap at that
level); it is never run by hand. Before any model-written code runs it
1. lowers its resource limits (a process cannot raise a lowered hard limit),
2. at level "landlock", restricts itself with Landlock (read anywhere, write only in its directory,
   no TCP, no signals or abstract sockets outside) and drops every capability,
3. makes itself non-dumpable (no other process of its user may read its memory),
4. installs two audit hooks (Python cannot remove one): the verdict hook, which alone holds the
   parent's nonce, and the confinement hook, which refuses what the program must not do.
Then it runs one program (mode "program") or cells one by one (mode "shell").

The verdict (mode "program"): the parent sends 32 random bytes first on stdin, read raw so no
buffer keeps them; the verdict hook keeps them in its closure, out of every namespace, frame and
traceback the program can reach. It writes them to the reply pipe, and exits, only on the audit
event "sandbox.returned" raised with no arguments by this process's `run_program` frame at the one
line after `exec` returned; a forged event from any other frame or line, from a finalizer or a
signal handler (they pass arguments) is ignored. The parent passes a program when, and only when, it
reads exactly its nonce. docs/sandbox.md says what this does not stop.
"""
import ctypes  # the runner's own imports, made before the hooks (the program may import them too)
import dis
import gc
import json
import os
import re
import resource
import signal
import sys
import traceback

NONCE_BYTES = 32
PROC_MEMORY = re.compile(r"/proc/[^/]+/(task/[^/]+/)?(mem|map_files)(/|$)")
# audit events refused outright: network, new processes, signals to others, leaving the directory,
# metadata changes, and the ways to reach other code's frames or memory (the verdict hook's nonce)
DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
          "os.kill", "os.killpg", "signal.pthread_kill", "pty.", "os.startfile", "os.chdir", "os.fchdir", "os.chroot",
          "os.chown", "os.chflags", "os.link", "os.symlink", "os.setxattr", "os.removexattr",
          "resource.prlimit", "gc.get_", "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
          "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.string_at", "ctypes.wstring_at",
          "ctypes.cdata")
# event -> (how many leading arguments are paths, the positions of its dir_fd arguments)
PATH_EVENTS = {"os.remove": (1, (1,)), "os.unlink": (1, (1,)), "os.rmdir": (1, (1,)), "shutil.rmtree": (1, (1,)),
               "os.mkdir": (1, (2,)), "os.truncate": (1, ()), "os.chmod": (1, (2,)), "os.utime": (1, (3,)),
               "os.rename": (2, (2, 3)), "os.replace": (2, (2, 3))}


def set_limits(cpu_seconds, memory_bytes, file_bytes, open_files):
    """CPU time (SIGXCPU at the limit, SIGKILL a second later), address space, file size, open files,
    no core dumps."""
    for which, soft, hard in ((resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
                              (resource.RLIMIT_AS, memory_bytes, memory_bytes),
                              (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
                              (resource.RLIMIT_NOFILE, open_files, open_files), (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(which, (soft, hard))


# Landlock (Linux >= 5.13): the syscall numbers are the same on every architecture but alpha
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
FS_EXECUTE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
FS_MAKE_CHAR, FS_MAKE_BLOCK = 1 << 6, 1 << 11
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}  # + refer, truncate, ioctl
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 38, 4, 24


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(libc, root):
    """Restrict this process and its future children: every filesystem right this kernel's Landlock
    knows is handled; "/" grants reading and executing, `root` everything but device nodes; TCP bind
    and connect (ABI >= 4), abstract unix sockets and signals outside the domain (ABI >= 6) are
    refused."""
    abi = libc.syscall(LANDLOCK_CREATE_RULESET, None, 0, 1)
    if abi < 1:
        raise OSError(ctypes.get_errno(), "Landlock is not available")
    fs = FS_RIGHTS_BY_ABI[max(a for a in FS_RIGHTS_BY_ABI if a <= abi)]
    attr = RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # the struct as this ABI knows it
    ruleset = libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    for path, rights in (("/", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR), (root, fs & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneathAttr(rights, fd)
        if ruleset < 0 or libc.syscall(LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"Landlock: cannot add the rule for {path}")
        os.close(fd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "Landlock: cannot restrict this process")
    os.close(ruleset)


def drop_capabilities(libc):
    """No capability now (capset) nor after an exec (the bounding set): root is then an ordinary user
    that cannot read other processes' memory, bypass file permissions or make device nodes."""
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability this kernel knows
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "cannot drop capabilities")


def confinement_hook(root):
    """The audit hook that refuses what the program must not do (DENIED, and any write, creation,
    removal or rename outside `root`, and reading another process's memory)."""
    realpath, isabs, join, fsdecode = os.path.realpath, os.path.isabs, os.path.join, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path):
        if isinstance(path, int):
            return True  # a file descriptor: checked when it was opened
        path = fsdecode(path)
        return realpath(path if isabs(path) else join(root, path)).startswith(root + "/")

    def hook(event, args):
        if event.startswith(DENIED):
            raise PermissionError(f"confined: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            if PROC_MEMORY.match(realpath(fsdecode(path))):
                raise PermissionError(f"confined: reading process memory ({path})")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags
            # os.open's event does not carry its dir_fd: a relative path may then lie anywhere
            if writing and (not inside(path) or (not isinstance(mode, str) and not isabs(fsdecode(path)))):
                raise PermissionError(f"confined: writing {path} outside the working directory")
        elif event == "sqlite3.connect":
            database = fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
            path = database[5:].split("?")[0] if database.startswith("file:") else database
            if path not in ("", ":memory:") and not inside(path):
                raise PermissionError(f"confined: a database {database} outside the working directory")
        elif event in PATH_EVENTS:
            n, fds = PATH_EVENTS[event]
            relative_to_fd = any(args[i] not in (None, -1) for i in fds if i < len(args))
            if relative_to_fd or not all(inside(p) for p in args[:n] if isinstance(p, (str, bytes))):
                raise PermissionError(f"confined: {event} outside the working directory")

    return hook


def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"confined: {name} is not allowed")
    return refused


def stub_unaudited(signals):
    """Functions Python does not audit, replaced before the program runs (a program that re-creates
    the posix or _signal module gets the originals back: the OS levels stop what they do). `signals`:
    refuse signal handlers too (a handler runs Python code inside whatever frame it interrupts, the
    verdict hook's included); the shell keeps them for its own alarm."""
    import _posixsubprocess
    import _signal
    import posix
    for module, name in ((os, "mkfifo"), (posix, "mkfifo"), (os, "mknod"), (posix, "mknod")):
        setattr(module, name, refuse(f"os.{name}"))
    _posixsubprocess.fork_exec = refuse("_posixsubprocess.fork_exec")  # subprocess audits; this does not
    if signals:
        signal.signal = _signal.signal = refuse("signal.signal")


def verdict_hook(nonce, reply_fd, frame, line):
    """The audit hook that reports a pass: on "sandbox.returned" with no arguments from `frame` at
    `line`, it writes `nonce` to the reply pipe and exits 0, skipping atexit and every patched exit.
    It never raises and never calls the program's code (the nonce is in its frame's closure), and
    collects no garbage while it checks (a finalizer would run inside its frame)."""
    write, exit_now, getframe, isenabled, disable = os.write, os._exit, sys._getframe, gc.isenabled, gc.disable

    def hook(event, args):
        if event != "sandbox.returned" or args:
            return
        if isenabled():
            disable()
        try:
            caller = getframe(1)
            if caller is frame and caller.f_lineno == line:
                write(reply_fd, nonce)
                exit_now(0)
        except BaseException:
            pass

    return hook


def confine(settings):
    """Steps 1-4 of the module doc (the verdict hook is run_program's)."""
    root = os.path.realpath(os.getcwd())
    set_limits(settings["cpu_seconds"], settings["memory_bytes"], settings["file_bytes"], settings["open_files"])
    libc = ctypes.CDLL(None, use_errno=True)
    if settings["level"] == "landlock":
        landlock(libc, root)
        drop_capabilities(libc)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    sys.addaudithook(confinement_hook(root))


def read_exactly(fd, n):
    data = b""
    while len(data) < n and (chunk := os.read(fd, n - len(data))):
        data += chunk
    return data


def new_main():
    """A fresh module as __main__ for the model's code: the runner's own __main__ (this file) is out
    of its sight."""
    main = type(sys)("__main__")
    sys.modules["__main__"] = main
    return main.__dict__


def run_program(settings, reply_fd):
    """Mode "program": read the nonce and the program from stdin, run it; pass only through the
    verdict hook (module doc)."""
    nonce = read_exactly(0, NONCE_BYTES)
    source = sys.stdin.read()
    # the runner's frame calls only what these names hold now, never what the program may have patched
    frame, run, audit, print_exc, exit_now = sys._getframe(0), exec, sys.audit, traceback.print_exc, os._exit
    line = next(i.positions.lineno for i in dis.get_instructions(run_program) if i.argval == "sandbox.returned")
    sys.addaudithook(verdict_hook(nonce, reply_fd, frame, line))  # before the hook that refuses new hooks
    del nonce
    confine(settings)
    stub_unaudited(signals=True)
    try:
        code = compile(source, "program.py", "exec")
        run(code, new_main())
    except BaseException:  # an assertion, an error, and sys.exit() too: only a return passes
        print_exc()
        exit_now(1)
    else:
        audit("sandbox.returned")


def run_shell(settings, reply_fd):
    """Mode "shell": cells as (a "length limit" line, source) on stdin, each answered on the reply pipe with a
    JSON line {"timed_out"} once its output (stdout, stderr, the displayed value, the traceback) is
    flushed to this process's stdout. SIGALRM after the cell's limit raises TimeoutError inside it."""
    confine(settings)
    stub_unaudited(signals=False)
    timed_out = []
    limit = [settings["cell_timeout"]]

    def alarm(signum, frame):
        timed_out.append(True)
        raise TimeoutError(settings.get("timeout_message") or f"the cell ran past its limit of {limit[0]:g} s")

    signal.signal(signal.SIGALRM, alarm)
    stdin = sys.stdin.buffer
    namespace = new_main()
    for name in settings.get("tools", ()):
        namespace[name] = tool_function(name, reply_fd, stdin)
    run_cell = start_interpreter(settings["ipython"], namespace)
    os.write(reply_fd, (json.dumps({"ready": True, "ipython": run_cell.__name__ == "ipython_cell"}) + "\n").encode())
    while header := stdin.readline():  # "LENGTH LIMIT": the cell's bytes and its time limit
        length, limit[0] = int(header.split()[0]), float(header.split()[1])
        source = stdin.read(length).decode()
        timed_out.clear()
        signal.setitimer(signal.ITIMER_REAL, limit[0])
        try:
            run_cell(source)
        except TimeoutError:  # the alarm outside the cell's own code (IPython's bookkeeping)
            traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(reply_fd, (json.dumps({"timed_out": bool(timed_out)}) + "\n").encode())


def tool_function(name, reply_fd, stdin):
    """A function the cells call that runs the parent's tool `name` outside the confinement: its
    arguments go as a JSON line on the reply pipe, the parent's answer (JSON, framed like a cell) comes
    back on stdin. The cell's alarm waits for the answer (SIGALRM blocked meanwhile), so an answer is
    never left on stdin to be read as the next cell; the parent bounds the tool's own time."""
    def tool(*args):
        request = json.dumps({"tool": name, "args": args}) + "\n"  # a TypeError for arguments JSON cannot carry
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            os.write(reply_fd, request.encode())
            answer = json.loads(stdin.read(int(stdin.readline())))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["result"]
    tool.__name__ = tool.__qualname__ = name
    return tool


def start_interpreter(ipython, namespace):
    """A function that runs one cell in `namespace`: IPython's InteractiveShell when `ipython` is
    True, or None and IPython is installed; otherwise a plain one that shows the last expression's
    repr and the traceback, as IPython would."""
    if ipython is not False:
        try:
            from IPython.core.interactiveshell import InteractiveShell
            from traitlets.config import Config
        except ImportError:
            if ipython:
                raise ImportError("install ipython to run an IPython shell (pip install ipython)") from None
        else:
            config = Config()
            config.HistoryManager.enabled = False  # no sqlite file of the session
            config.InteractiveShell.colors = "NoColor"
            shell = InteractiveShell.instance(config=config, user_ns=namespace)

            def ipython_cell(source):
                shell.run_cell(source, store_history=True)
            return ipython_cell
    import ast

    def plain_cell(source):
        try:
            tree = ast.parse(source, "<cell>")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<cell>", "exec"), namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
                if value is not None:
                    print(repr(value))
        except BaseException:
            kind, error, tb = sys.exc_info()
            traceback.print_exception(kind, error, tb.tb_next)  # from the cell's code on
    return plain_cell


if __name__ == "__main__":
    SETTINGS = json.loads(sys.argv[1])
    (run_program if SETTINGS["mode"] == "program" else run_shell)(SETTINGS, SETTINGS["reply_fd"])
