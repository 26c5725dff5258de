"""MINT's environment (evaluation/mint_env.py, mint_tasks.py, mint_replay.py): every branch of an episode on
hand-written tasks (tests/mint_layout/, no recordings needed), then conformance with MINT's own
recorded Lemur-70B-Chat runs in ../shared/data/mint: every recorded task, first message and
solution verdict, and a fixed sample of trajectories replayed turn by turn. The recording tests are
the only ones that read ../shared; without it they skip, naming the folder."""
import concurrent.futures
import glob
import json
import os

import pytest

from evaluation import mint_env, mint_replay, mint_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = os.path.join(ROOT, "tests", "mint_layout")
MINT_DIR = os.path.join(ROOT, "..", "shared", "data", "mint")
RUNS = os.path.join(MINT_DIR, "data", "outputs", "lemur-70b-chat-v1", "F=None")
recordings = pytest.mark.skipif(not os.path.isdir(RUNS), reason=f"MINT's recorded runs are not in {MINT_DIR}")


def task(subset, i=0):
    return mint_tasks.load(LAYOUT, subset)[i]


def left(steps, proposals):
    return f"You have {steps} steps left and {proposals} chances to propose solution left.\n"


def test_execute_then_solve_keeps_state_and_records_as_mint():
    episode = mint_env.Episode(task("gsm8k"), max_steps=5, max_propose=2, tools={"wikipedia_search": str})
    assert episode.first_message.endswith("---\n\nTask:\nWhat is 6 times 7? Solution output format: an integer.\n")
    assert "[1] wikipedia_search(query: str) -> str\n" in episode.first_message
    observation, done = episode.step("<thought> Compute. </thought>\n<execute>\nx = 6 * 7\nx\n</execute>")
    assert (observation, done) == ("Observation:\nOut[1]: 42\n" + left(4, 2), False)
    observation, done = episode.step("<execute>print(x)</execute>")
    assert (observation, done) == ("Observation:\n42\n" + left(3, 2), False)
    observation, done = episode.step("The answer is <solution> 42 </solution>.")
    assert (observation, done) == ("Observation:\n" + left(2, 1), True)
    state = episode.record()["state"]
    assert (state["success"], state["terminate_reason"], state["finished"]) == (True, "task_success", True)
    assert state["agent_action_count"] == {"propose_solution": 1, "use_tool": 2, "invalid_action": 0}
    assert [m["role"] for m in state["history"]] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert state["history"][5]["content"] == "Assistant:\nThe answer is <solution> 42 </solution>.\n"
    assert episode._shell is None  # closed with the episode
    assert episode.record()["task"] == {"task_name": "reasoning", "task_id": 0, "prompt": task("gsm8k").prompt,
                                        "reference": "42", "metadata": {}}


def test_a_wrong_solution_with_proposals_left_then_the_last_proposal():
    episode = mint_env.Episode(task("gsm8k"), max_steps=5, max_propose=2)
    assert episode.step("<solution> 30 </solution>") == ("Observation:\nYour answer is wrong.\n" + left(4, 1), False)
    assert episode.step("<solution> 50 </solution>") == ("Observation:\nYour answer is wrong.\n" + left(3, 0), True)
    assert (episode.success, episode.terminate_reason) == (False, "max_propose_steps")


def test_the_step_budget_runs_out():
    episode = mint_env.Episode(task("gsm8k"), max_steps=2, max_propose=2)
    observation, done = episode.step("<execute>y = 1</execute>")
    assert (observation, done) == ("Observation:\n[Executed Successfully with No Output]\n" + left(1, 2) +
                                   "You should take the last step to propose a solution.\n", False)
    observation, done = episode.step("<execute>y + 1</execute>")
    assert done and observation.startswith("Observation:\nOut[2]: 2\n")
    assert (episode.success, episode.terminate_reason, len(episode.history)) == (False, "max_steps", 4)


def test_invalid_actions_get_mints_message_and_count_as_mint_counts_them():
    episode = mint_env.Episode(task("gsm8k"), max_steps=5, max_propose=2)
    observation, _ = episode.step("I think it is 42.")
    assert observation == "Observation:\n" + mint_env.INVALID_INPUT_MESSAGE + "\n" + left(4, 2)
    observation, _ = episode.step("<solution>   </solution>")  # a proposal, though empty
    assert observation == "Observation:\n" + mint_env.INVALID_INPUT_MESSAGE + "\n" + left(3, 1)
    assert episode.counts == {"propose_solution": 1, "use_tool": 0, "invalid_action": 1}
    assert episode.step("", error="InvalidRequestError: context length")[1]  # the server's error ends it
    assert (episode.terminate_reason, episode.error) == ("error", "InvalidRequestError: context length")


def test_a_cell_past_its_limit_is_interrupted_and_the_shell_keeps_its_state():
    episode = mint_env.Episode(task("gsm8k"), cell_timeout=2)
    observation, _ = episode.step("<execute>\nkept = 5\nwhile True:\n    pass\n</execute>")
    assert "TimeoutError: Timed out after 2 seconds.\n" + left(4, 2) in observation
    assert "File <hidden_filepath>, in run_shell.<locals>.alarm(signum, frame)" in observation
    assert episode.step("<execute>print(kept)</execute>")[0] == "Observation:\n5\n" + left(3, 2)
    episode.close()


def test_output_is_cut_at_2000_characters_and_stderr_is_not_shown():
    episode = mint_env.Episode(task("gsm8k"))
    observation, _ = episode.step("<execute>import sys\nprint('warned', file=sys.stderr)\nprint('x' * 3000)</execute>")
    assert observation == "Observation:\n" + "x" * 2000 + "...\n[Output Truncated]\n" + left(4, 2)
    episode.close()


def test_the_network_tool_runs_outside_the_sandbox_and_code_tasks_do_not_get_it():
    queries = []
    episode = mint_env.Episode(task("gsm8k"), tools={"wikipedia_search": lambda q: queries.append(q) or f"Page: {q}"})
    observation, _ = episode.step("<execute>print(wikipedia_search('Lemur'))</execute>")
    assert (observation, queries) == ("Observation:\nPage: Lemur\n" + left(4, 2), ["Lemur"])
    episode.close()
    code = mint_env.Episode(task("humaneval"))
    assert "wikipedia_search" not in code.first_message
    observation, _ = code.step("<execute>wikipedia_search('x')</execute>")
    assert "NameError: name 'wikipedia_search' is not defined" in observation
    code.close()


def test_the_default_wikipedia_search_formats_as_mints_wrapper(monkeypatch):
    """Against canned API answers (the suite has no network): the top 2 results, a disambiguation page
    skipped, "Page: T\nSummary: S" joined by blank lines, 1000 characters."""
    import io
    import urllib.parse

    def answer(request, timeout):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.full_url).query))
        if query.get("list") == "search":
            body = {"query": {"search": [{"title": "Lemur"}, {"title": "Lemur (disambiguation)"}, {"title": "Ape"}]}}
        else:
            props = {"disambiguation": ""} if "disambiguation" in query["titles"] else {}
            body = {"query": {"pages": {"1": {"title": query["titles"], "extract": "x" * 600, "pageprops": props}}}}
        return io.BytesIO(json.dumps(body).encode())

    monkeypatch.setattr(mint_env.urllib.request, "urlopen", answer)
    assert mint_env.wikipedia_search("lemur") == ("Page: Lemur\nSummary: " + "x" * 600)[:1000]
    assert mint_env.wikipedia_search("lemur", chars=10_000).count("Page: ") == 1  # the 3rd result is not read


def test_escapes_fail_in_cells_and_in_checkers(tmp_path):
    outside = str(tmp_path)
    episode = mint_env.Episode(task("gsm8k"))
    observation, _ = episode.step(f"<execute>open({outside!r} + '/cell', 'w').write('x')</execute>")
    assert "PermissionError" in observation
    observation, _ = episode.step("<execute>import socket\nsocket.create_connection(('1.1.1.1', 80))</execute>")
    assert "PermissionError" in observation or "OSError" in observation
    episode.close()
    code = task("humaneval")
    forged = "import os\nos._exit(0)"  # exits 0 before the tests run
    assert not mint_tasks.check(code, forged).success
    written = f"open({outside!r} + '/answer', 'w').write('x') or 3.14"  # a TheoremQA answer evaluated in the sandbox
    assert not mint_tasks.check(task("theoremqa"), written).success
    assert os.listdir(outside) == []


def test_success_rules():
    gsm8k, negative, mmlu, theoremqa, primes = (task("gsm8k"), task("gsm8k", 1), task("mmlu"), task("theoremqa"),
                                                task("theoremqa", 1))
    assert mint_tasks.check(gsm8k, "43").success and not mint_tasks.check(gsm8k, "45").success  # within 5%
    assert mint_tasks.check(gsm8k, "The answer is 42 apples").success  # not a number: the reference is in it
    assert not mint_tasks.check(negative, "-3").success  # MINT's 5% of a negative reference admits nothing
    assert mmlu.options == {"a": "4", "b": "7", "c": "9", "d": "10"}
    assert mint_tasks.check(mmlu, "B").success and mint_tasks.check(mmlu, "7").success
    assert not mint_tasks.check(mmlu, "C").success and not mint_tasks.check(mmlu, "a) 4").success
    # MINT drops the options inside the right one from a list it is iterating: "2" after "1" survives,
    # and then rules out the right answer "12"
    skipped = mint_tasks.make_task("mmlu", {"id": 9, "prompt": "Pick.\nOptions: A ) 1 , B ) 2 , C ) 12 , D ) 7",
                                            "reference": "c"}, "", "")
    assert not mint_tasks.check(skipped, "12").success and mint_tasks.check(skipped, "C").success
    assert mint_tasks.check(theoremqa, "3.13").success and not mint_tasks.check(theoremqa, "3.5").success
    assert mint_tasks.check(theoremqa, "x = 3.14 radians").success  # MINT's rewriting: after "=", units dropped
    assert mint_tasks.check(theoremqa, "np.pi").success  # not a literal: evaluated in the sandbox
    assert not mint_tasks.check(theoremqa, "math.pi").success  # MINT's namespace has no math
    assert mint_tasks.check(primes, "[3, 2]").success and not mint_tasks.check(primes, "[2, 3, 5]").success
    assert mint_tasks.check(primes, "()").error == "IndexError: list index out of range"  # MINT shows its error
    humaneval = task("humaneval")
    assert mint_tasks.check(humaneval, "def add(a, b):\n    return a + b").success
    assert not mint_tasks.check(humaneval, "def add(a, b):\n    return a - b").success


def test_replay_normalises_only_paths_addresses_and_where_a_time_limit_landed():
    ours = "File /usr/lib/python3.11/site-packages/sympy/core.py:10, in f()\n<object at 0x7f3a2b1c9d40>"
    recorded = "File /mnt/x/envs/mint/lib/python3.9/site-packages/sympy/core.py:10, in f()\n<object at 0x55d2e1a0b2f0>"
    assert mint_replay.normalise(ours) == mint_replay.normalise(recorded)
    assert mint_replay.normalise("Out[1]: 42") != mint_replay.normalise("Out[2]: 42")
    assert mint_replay.layout(os.path.join(RUNS, "max5_p2+tool+cd", "reasoning", "mmlu", "results.jsonl")) == {
        "subset": "mmlu", "max_steps": 5, "max_propose": 2, "mint_dir": os.path.abspath(MINT_DIR)}


# ---- MINT's recorded runs of Lemur-70B-Chat

def recorded(budget="*"):
    """[(path, record)] of every recorded trajectory."""
    paths = sorted(glob.glob(os.path.join(RUNS, budget, "*", "*", "results.jsonl")))
    return [(path, json.loads(line)) for path in paths for line in open(path, encoding="utf-8")]


@recordings
def test_every_recorded_task_and_first_message_is_mints():
    tasks = {subset: {t.id: t for t in mint_tasks.load(MINT_DIR, subset)} for subset in mint_tasks.SUBSETS}
    records = recorded()
    assert len(records) == 904
    for path, record in records:
        where = mint_replay.layout(path)
        ours = tasks[where["subset"]][record["task"]["task_id"]]
        assert ours.to_dict() == record["task"]
        assert mint_tasks.first_message(ours, where["max_steps"], where["max_propose"]) == \
            record["state"]["history"][0]["content"]


def recorded_verdicts():
    """(subset, task id, solution, MINT's verdict) of every recorded <solution>: wrong when MINT answered
    "Your answer is wrong.", right when the episode ended in task_success right after it."""
    verdicts = []
    for path, record in recorded():
        history, state = record["state"]["history"], record["state"]
        for i in range(1, len(history), 2):
            text = mint_replay.assistant_text(history[i]["content"])
            answer = mint_env.tagged(text, "solution")
            if "<solution>" not in text or not answer:
                continue
            after = history[i + 1]["content"] if i + 1 < len(history) else None
            verdict = state["terminate_reason"] == "task_success" if after is None else \
                False if after.startswith("Observation:\nYour answer is wrong.") else None
            verdicts.append((mint_replay.layout(path)["subset"], record["task"]["task_id"], answer, verdict))
    return verdicts


@recordings
def test_every_recorded_solution_verdict_agrees():
    tasks = {subset: {t.id: t for t in mint_tasks.load(MINT_DIR, subset)} for subset in mint_tasks.SUBSETS}
    verdicts = recorded_verdicts()
    assert len(verdicts) == 539 and None not in [v[3] for v in verdicts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # code verdicts each run a sandboxed program
        ours = list(pool.map(lambda v: mint_tasks.check(tasks[v[0]][v[1]], v[2]).success, verdicts))
    wrong = [(v[0], v[1], v[2][:80]) for v, got in zip(verdicts, ours) if got != v[3]]
    assert wrong == []


# A fixed sample of max5_p2 trajectories: several turns of code, errors, tracebacks, invalid actions,
# a network call and a server error; each replayed whole.
SAMPLE = {"code_generation/humaneval": {0, 13, 27}, "code_generation/mbpp": {2, 12}, "reasoning/gsm8k": {7, 22},
          "reasoning/hotpotqa": {3}, "reasoning/math": {0, 7}, "reasoning/mmlu": {16, 20}, "reasoning/theoremqa": {5, 14}}


@recordings
def test_a_fixed_sample_of_recorded_trajectories_replays_turn_by_turn():
    compared = equal = network = servers = 0
    for name, ids in SAMPLE.items():
        summary = mint_replay.replay_file(os.path.join(RUNS, "max5_p2+tool+cd", name, "results.jsonl"), only=ids)
        assert summary["trajectories"] == len(ids)
        assert summary["success_agree"] == summary["terminate_agree"] == len(ids), summary["disagreements"]
        compared += summary["observations_compared"]
        equal += summary["observations_equal"]
        network += summary["network_turns"]
        servers += summary["server_errors"]
    assert compared >= 30 and network >= 2 and servers == 1 and equal == compared
