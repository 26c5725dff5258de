"""Replay of MINT's recorded runs through our environment: conformance, turn by turn.

    from evaluation import mint_replay
    summary = mint_replay.replay_file(".../max5_p2+tool+cd/reasoning/gsm8k/results.jsonl")
    python -m evaluation.agent --replay $(find MINT_DIR/data/outputs -name results.jsonl)   # the command

Each recorded trajectory's assistant messages go through our environment (evaluation/mint_env.py)
and, turn by turn, our observation is compared with the one MINT recorded (after `normalise`:
where Python files lie, memory addresses, where a time limit landed), then our `success`,
`terminate_reason` and action counts with MINT's. Turns whose cell called the network tool
(wikipedia_search, answered here by a stub) and episodes that ended in an error of the model's
server take MINT's recorded observation or outcome and are counted apart. The task set, the budget
and the MINT folder come from the results' path (`<mint_dir>/data/outputs/<model>/F=None/
max5_p2+tool+cd/<kind>/<subset>/results.jsonl`).

Trade-offs: episodes run in `jobs` threads (each one's shell is its own process); a cell that timed
out in MINT times out here too, so a full replay of the 904 recorded Lemur-70B-Chat trajectories
takes its cells' time (docs/agents.md gives it).
"""
import concurrent.futures
import json
import os
import re

from evaluation import mint_env, mint_tasks

NETWORK_STUB = "[replay: the network tool is not called; MINT's recorded observation stands]"
NORMALISE = [
    # where a looping cell was when its time ran out: the cell's own frame and the final line are kept
    (re.compile(r"(TimeoutError +Traceback \(most recent call last\)\n(?:[^\n]+\n)+\n)(?:.*\n)*?(TimeoutError: )"),
     r"\1<frames where the time limit landed>\n\2"),
    # the frame of the shell's own time-limit handler (MINT's PythonREPL.time_limit, our sandbox's alarm)
    (re.compile(r"File [^\n]*, in [^\n]*(?:signal_handler|alarm)\(signum, frame\)\n(?:(?: *\d+|-+>)[^\n]*\n)+"),
     "File <time-limit handler>\n"),
    (re.compile(r"\b0x[0-9a-fA-F]{6,}\b"), "0x<address>"),  # object reprs
    # where Python files lie (python_file)
    (re.compile(r"/[\w.~+-]+(?:/[\w.~+-]+)*\.py\b"), lambda m: python_file(m.group(0))),
]


INSTALLED = re.compile(r"/(?:lib/python3\.\d+/)?(?:site|dist)-packages/|/lib/python3\.\d+/")


def python_file(path: str) -> str:
    """Where a Python file lies, out of its name: installed code from its package on, any other by
    its file name alone."""
    return "<path>/" + (INSTALLED.split(path)[-1] if INSTALLED.search(path) else os.path.basename(path))


def normalise(text: str) -> str:
    for pattern, replacement in NORMALISE:
        text = pattern.sub(replacement, text)
    return text


def layout(path: str) -> dict:
    """subset, budget and MINT folder from a results path in MINT's layout."""
    parts = os.path.abspath(path).split(os.sep)
    budget = re.match(r"max(\d+)_p(\d+)", parts[-4])
    if parts[-2] not in mint_tasks.SUBSETS or not budget:
        raise ValueError(f"{path}: not in MINT's layout (.../<model>/F=.../maxN_pK+tool+cd/<kind>/<subset>/"
                         f"results.jsonl)")
    # MINT's own runs lie in <mint_dir>/data/outputs/; others (our live runs) name no MINT folder
    root = os.sep.join(parts[:len(parts) - 1 - parts[::-1].index("outputs") - 1]) if "outputs" in parts else None
    return {"subset": parts[-2], "max_steps": int(budget.group(1)), "max_propose": int(budget.group(2)),
            "mint_dir": root}


def assistant_text(content: str) -> str:
    """The model's message as MINT received it, from the history entry MINT made of it."""
    content = content[:-1] if content.endswith("\n") else content
    return content.removeprefix("Assistant:\n")


def replay(record: dict, task: mint_tasks.Task, max_steps: int, max_propose: int, level: str | None = None) -> dict:
    """One recorded trajectory through our environment: what agreed and what did not."""
    calls = []
    episode = mint_env.Episode(task, max_steps, max_propose, level=level,
                               tools={"wikipedia_search": lambda *args: calls.append(args) or NETWORK_STUB})
    state, history = record["state"], record["state"]["history"]
    out = {"task_id": task.id, "compared": 0, "equal": 0, "network_turns": 0, "server_error": False,
           "disagreements": []}
    if episode.first_message != history[0]["content"]:
        out["disagreements"].append({"turn": 0, "reason": "first message differs"})
    try:
        for i in range(1, len(history), 2):
            if episode.finished:
                out["disagreements"].append({"turn": i, "reason": f"ours ended ({episode.terminate_reason}) "
                                                                  "before the recorded trajectory"})
                break
            before = len(calls)
            observation, done = episode.step(assistant_text(history[i]["content"]))
            recorded = history[i + 1]["content"] if i + 1 < len(history) else None
            if recorded is None:
                continue
            if len(calls) > before:
                out["network_turns"] += 1
                episode.history[-1]["content"] = recorded
            else:
                out["compared"] += 1
                if normalise(observation) == normalise(recorded):
                    out["equal"] += 1
                else:
                    out["disagreements"].append({"turn": i + 1, "reason": "observation differs", "ours":
                                                 observation[:600], "recorded": recorded[:600]})
        if state["terminate_reason"] == "error" and not episode.finished:
            out["server_error"] = True
            episode.step("", error=state["error"])
    finally:
        episode.close()
    out.update(success=episode.success, recorded_success=state["success"],
               terminate_reason=episode.terminate_reason, recorded_terminate_reason=state["terminate_reason"])
    if episode.success != state["success"]:
        out["disagreements"].append({"turn": None, "reason": f"success: ours {episode.success}, "
                                                             f"recorded {state['success']}"})
    if episode.terminate_reason != state["terminate_reason"]:
        out["disagreements"].append({"turn": None, "reason": f"terminate_reason: ours {episode.terminate_reason}, "
                                                             f"recorded {state['terminate_reason']}"})
    if [m for m in episode.history if m["role"] == "assistant"] != [m for m in history if m["role"] == "assistant"]:
        out["disagreements"].append({"turn": None, "reason": "the assistant messages in the history differ"})
    if episode.counts != state["agent_action_count"]:
        out["disagreements"].append({"turn": None, "reason": f"action counts: ours {episode.counts}, "
                                                             f"recorded {state['agent_action_count']}"})
    return out


def replay_file(path: str, mint_dir: str | None = None, level: str | None = None, jobs: int = 2,
                only: set | None = None) -> dict:
    """Every trajectory of one results.jsonl (or those whose task id is in `only`); a summary."""
    where = layout(path)
    if not (mint_dir or where["mint_dir"]):
        raise ValueError(f"{path}: not under a MINT folder's data/outputs; give --mint_dir")
    tasks = {t.id: t for t in mint_tasks.load(mint_dir or where["mint_dir"], where["subset"])}
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if only is None or r["task"]["task_id"] in only]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda r: replay(r, tasks[r["task"]["task_id"]], where["max_steps"],
                                                 where["max_propose"], level), records))
    return {"file": path, "trajectories": len(results),
            "success_agree": sum(r["success"] == r["recorded_success"] for r in results),
            "terminate_agree": sum(r["terminate_reason"] == r["recorded_terminate_reason"] for r in results),
            "observations_compared": sum(r["compared"] for r in results),
            "observations_equal": sum(r["equal"] for r in results),
            "network_turns": sum(r["network_turns"] for r in results),
            "server_errors": sum(r["server_error"] for r in results),
            "recorded_successes": sum(r["recorded_success"] for r in results),
            "replayed_successes": sum(r["success"] for r in results),
            "disagreements": [{"task_id": r["task_id"], **d} for r in results for d in r["disagreements"]]}
