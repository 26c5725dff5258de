"""MINT's environment as a step function: one episode per task, driven one assistant message at a time.

    from evaluation import mint_env, mint_tasks
    episode = mint_env.Episode(mint_tasks.load(MINT_DIR, "gsm8k")[0], max_steps=5, max_propose=2)
    episode.first_message                     # the first user message, as MINT builds it
    observation, done = episode.step("<thought>...</thought> <execute>print(6 * 7)</execute>")
    episode.record()                          # a line of MINT's results.jsonl: {"state": ..., "task": ...}

Used by `python -m evaluation.agent` (live runs) and evaluation/mint_replay.py (MINT's recorded runs). The
protocol is MINT's at commit 856af63 (`mint/envs/general_env.py`, `mint/datatypes.py`,
`mint/tools/python_tool.py`, `mint/agents/base.py`); docs/agents.md describes it.

Trade-offs: a step blocks while its cell runs (at most the cell limit, 30 s); a batch driver runs
episodes in threads, each waiting on its own shell's process, so one episode's cell never holds
another's. The shell starts at the first <execute> and closes when the episode ends. The network
tool (`wikipedia_search`) is a function passed in, run outside the sandbox: the default asks
Wikipedia's API as MINT's wrapper does (top 2 pages' summaries, 1000 characters).
"""
import json
import re
import urllib.parse
import urllib.request

from evaluation import mint_tasks, sandbox

CELL_TIMEOUT = 30  # seconds, MINT's PythonREPL
OUTPUT_CHARS = 2000  # MINT keeps this much of a cell's output
INVALID_INPUT_MESSAGE = (
    "I don't understand your input. \n"
    "If you want to execute code, please use <execute> YOUR_CODE_HERE </execute>.\n"
    "If you want to give me an answer, please use <solution> YOUR_SOLUTION_HERE </solution>.\n"
    "For example: The answer to the question is <solution> 42 </solution>. \n"
)
# the frame of the sandbox's own time-limit handler in a timed-out cell's traceback: its file is hidden,
# as MINT hides its own (MINT's regex puts the folder where the line number was meant to go)
HANDLER_FILE = re.compile(r"File \S*evaluation/sandbox_child\.py:\d+")


def tagged(text: str, tag: str) -> str:
    """MINT's parse: the stripped contents of every <tag>...</tag>, one per line ("" if none)."""
    return "\n".join(part.strip() for part in re.findall(rf"<{tag}>(.*?)</{tag}>", "\n" + text + "\n", re.DOTALL))


def cell_observation(output: str) -> str:
    """A cell's raw output as MINT shows it: a note when silent, the handler's file hidden, the first
    2000 characters, stripped."""
    if output == "":
        output = "[Executed Successfully with No Output]"
    output = HANDLER_FILE.sub("File <hidden_filepath>", output)
    if len(output) > OUTPUT_CHARS:
        output = output[:OUTPUT_CHARS] + "...\n[Output Truncated]"
    return output.strip()


def wikipedia_search(query: str, top_k: int = 2, chars: int = 1000, timeout: float = 10.0) -> str:
    """MINT's tool over Wikipedia's API: the summaries of the top `top_k` search results that are
    neither missing nor disambiguation pages, as "Page: T\\nSummary: S" joined by blank lines."""
    def api(**params):
        url = "https://en.wikipedia.org/w/api.php?" + urllib.parse.urlencode({"format": "json", **params})
        request = urllib.request.Request(url, headers={"User-Agent": "lemur-jax-mint/1.0"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    found = api(action="query", list="search", srsearch=str(query)[:300], srlimit=10, srprop="")
    summaries = []
    for title in [hit["title"] for hit in found["query"]["search"]][:top_k]:
        pages = api(action="query", prop="extracts|pageprops", explaintext=1, exintro=1, titles=title,
                    redirects=1)["query"]["pages"]
        page = next(iter(pages.values()))
        if "missing" not in page and "disambiguation" not in page.get("pageprops", {}):
            summaries.append(f"Page: {title}\nSummary: {page.get('extract', '').strip()}")
    if not summaries:
        return "Wikipedia Search Result was found"  # sic: MINT's words when nothing is found
    return "\n\n".join(summaries)[:chars]


class Episode:
    """One task under a budget of `max_steps` actions, at most `max_propose` of them solutions.
    `tools` maps each tool name the task gets to the function that answers it (default: the network
    wikipedia_search); `level` is the sandbox's isolation level (sandbox.isolation)."""

    def __init__(self, task: mint_tasks.Task, max_steps: int = 5, max_propose: int = 2, *, tools: dict | None = None,
                 level: str | None = None, cell_timeout: float = CELL_TIMEOUT):
        self.task, self.max_steps, self.max_propose = task, max_steps, max_propose
        self.level, self.cell_timeout = level, cell_timeout
        known = {"wikipedia_search": wikipedia_search, **(tools or {})}
        self.tools = {name: known[name] for name in task.tools}
        self.first_message = mint_tasks.first_message(task, max_steps, max_propose)
        self.history = [{"role": "user", "content": self.first_message}]
        self.latest_output = {"content": self.first_message}
        self.counts = {"propose_solution": 0, "use_tool": 0, "invalid_action": 0}
        self.token_counter = {}  # the driver's to fill (MINT records the model's token usage here)
        self.finished, self.success, self.terminate_reason, self.error = False, False, None, None
        self._shell = None

    def step(self, text: str, error: str | None = None) -> tuple:
        """Take one assistant message (or the model server's `error`, which ends the episode as MINT's
        "error"); return the next user message and whether the episode is over."""
        assert not self.finished, "the episode is over"
        if text:
            shown = text if text.lstrip().startswith("Assistant:") else "Assistant:\n" + text
            self.history.append({"role": "assistant", "content": shown + "\n"})
        if error is not None:
            observation = f"An error occurred. {error}"
            self.finished, self.error, self.terminate_reason = True, error, "error"
        elif "<solution>" in text:
            observation = self._propose(text)
        else:
            observation = self._execute(text)
        self._check_budget()
        steps_left = self.max_steps - sum(self.counts.values())
        message = "Observation:\n" + (f"{observation}\n" if observation is not None else
                                      "" if self.success else "Your answer is wrong.\n")
        message += f"You have {steps_left} steps left and {self.max_propose - self.counts['propose_solution']} " \
                   "chances to propose solution left.\n"
        if steps_left <= 1:
            message += "You should take the last step to propose a solution.\n"
        if not self.finished:  # MINT logs no message after the last step
            self.history.append({"role": "user", "content": message})
            self.latest_output = {"observation": observation, "feedback": "", "feedback_type": "no_feedback",
                                  "success": self.success, "content": message}
        else:
            self.close()
        return message, self.finished

    def _execute(self, text: str) -> str:
        code = tagged(text, "execute")
        if not code:
            self.counts["invalid_action"] += 1
            return INVALID_INPUT_MESSAGE
        if self._shell is None:
            self._shell = sandbox.Shell(self.cell_timeout, level=self.level, ipython=True, tools=self.tools,
                                        stderr=False, timeout_message=f"Timed out after {self.cell_timeout:g} seconds.")
        observation = cell_observation(self._shell.run(code).output)
        self.counts["use_tool"] += 1
        return observation

    def _propose(self, text: str) -> str | None:
        self.counts["propose_solution"] += 1
        answer = tagged(text, "solution")
        if not answer:
            return INVALID_INPUT_MESSAGE
        checked = mint_tasks.check(self.task, answer, level=self.level)
        if checked.success:
            self.finished, self.success, self.terminate_reason = True, True, "task_success"
        return checked.error  # None: "Your answer is wrong." (or nothing, after a success)

    def _check_budget(self):
        if self.finished:
            return
        if self.counts["propose_solution"] >= self.max_propose:
            self.finished, self.terminate_reason = True, "max_propose_steps"
        elif sum(self.counts.values()) >= self.max_steps:
            self.finished, self.terminate_reason = True, "max_steps"

    def record(self) -> dict:
        """This episode as a line of MINT's results.jsonl."""
        state = {"history": self.history, "finished": self.finished, "success": self.success,
                 "latest_output": self.latest_output, "agent_action_count": self.counts,
                 "token_counter": self.token_counter, "terminate_reason": self.terminate_reason, "error": self.error}
        return {"state": state, "task": self.task.to_dict()}

    def close(self):
        """Close the shell (done when the episode ends; call it to abandon one)."""
        if self._shell is not None:
            self._shell.close()
            self._shell = None
