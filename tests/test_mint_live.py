"""Live MINT runs (evaluation/agent.py): through an OpenAI-compatible endpoint that replays
Lemur-70B-Chat's recorded replies, a live run reproduces MINT's recorded trajectories and verdicts
(a MINT conformance test: it reads ../shared/data/mint, else skips naming it); through our engine
on a tiny model whose tokens are forced to scripted replies (so shells really run), a (1, 2, 2)
mesh gives what one device gives, two episodes at a time what eight give, and an episode whose
cell sleeps holds no one; requests are MINT's; resuming skips what is done; settings are kept."""
import http.server
import io
import json
import math
import os
import threading

import jax
import numpy as np
import pytest
import sentencepiece as spm

import chat
import decode
import model
import sharding
from evaluation import agent, mint_replay, mint_tasks, server
from evaluation.openai_api import Prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINT_DIR = os.path.join(ROOT, "..", "shared", "data", "mint")
RUNS = os.path.join(MINT_DIR, "data", "outputs", "lemur-70b-chat-v1", "F=None", "max5_p2+tool+cd")
recordings = pytest.mark.skipif(not os.path.isdir(RUNS), reason=f"MINT's recorded runs are not in {MINT_DIR}")


class Scripted(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers each conversation with the next
    assistant message of the trajectory whose first message it starts with (chat or MINT's
    completion prompt), or vLLM's context-length error where the trajectory ended in one.
    `requests` keeps every request body."""

    def __init__(self, trajectories: dict):
        self.trajectories, self.requests, self.lock = trajectories, [], threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, body: dict) -> tuple[int, dict]:
        if "messages" in body:
            first = body["messages"][1]["content"]
            said = [m["content"] for m in body["messages"] if m["role"] == "assistant"]
        else:
            first = next(f for f in self.trajectories if body["prompt"].startswith(f"\n\nHuman: {f}"))
            said = body["prompt"].split("\n\nAssistant: ")[1:]
        replies, error = self.trajectories[first]
        if [agent_message(r) for r in replies[:len(said)]] != [s if "messages" in body else
                                                              s.split("\n\nHuman: ")[0] for s in said]:
            return 500, {"error": {"message": "the conversation left the script"}}
        if len(said) == len(replies):
            assert error, "asked past the end of a trajectory that did not end in an error"
            return 400, {"error": {"message": "This model's maximum context length is 4096 tokens. However, you "
                                              "requested 4138 tokens (3626 in the messages, 512 in the completion).",
                                   "type": "invalid_request_error", "param": None, "code": 400}}
        text, usage = replies[len(said)], {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if "messages" in body else {
            "index": 0, "text": text}
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
                     "choices": [{**choice, "finish_reason": "stop", "logprobs": None}], "usage": usage}


def agent_message(reply: str) -> str:
    """How the environment puts a reply into the history (MINT's)."""
    return "Assistant:\n" + reply + "\n"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "test"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, **body})
        try:
            self._send(*self.server.answer(body))
        except Exception as e:  # a request off the script: the client sees why
            self._send(500, {"error": {"message": f"the scripted endpoint cannot answer: {e!r}"}})


def recorded(subset: str) -> dict:
    """task id -> MINT's record of one subset at max5_p2."""
    with open(os.path.join(RUNS, mint_tasks.SUBSETS[subset][0], subset, "results.jsonl"), encoding="utf-8") as f:
        return {r["task"]["task_id"]: r for r in map(json.loads, f)}


def script(records) -> dict:
    """first message -> (the assistant's replies as the model wrote them, whether it ended in an error)."""
    return {r["state"]["history"][0]["content"]: (
        [mint_replay.assistant_text(m["content"]) for m in r["state"]["history"] if m["role"] == "assistant"],
        r["state"]["terminate_reason"] == "error") for r in records}


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def same_as_recorded(ours: dict, theirs: dict, task, seen: dict) -> list[str]:
    """How a live record differs from MINT's: outcome, counts, every assistant message, and every
    observation after normalising, but those after a network call (offline here, online there) and
    those where the replay of MINT's record differs too (the machine's libraries: docs/agents.md),
    counted in seen["excused"] beside seen["compared"]."""
    problems, machine = [], None
    for key in ("success", "terminate_reason", "agent_action_count", "finished"):
        if ours["state"][key] != theirs["state"][key]:
            problems.append(f"{key}: ours {ours['state'][key]}, MINT's {theirs['state'][key]}")
    mine, recorded_ = ours["state"]["history"], theirs["state"]["history"]
    if len(mine) != len(recorded_):
        return problems + [f"history of {len(mine)} messages, MINT's {len(recorded_)}"]
    network = [i for i, turn in enumerate(ours["turns"]) if turn.get("network_calls")]
    for i, (a, b) in enumerate(zip(mine, recorded_)):
        if a["role"] != b["role"]:
            problems.append(f"message {i}: role")
        elif a["role"] == "assistant" and a["content"] != b["content"]:
            problems.append(f"message {i}: assistant text")
        elif a["role"] == "user" and i and (i - 2) // 2 not in network:
            seen["compared"] += 1
            if mint_replay.normalise(a["content"]) == mint_replay.normalise(b["content"]):
                continue
            if machine is None:  # the turns where replaying MINT's record here differs too
                replayed = mint_replay.replay(theirs, task, 5, 2)
                machine = {d["turn"] for d in replayed["disagreements"] if d["reason"] == "observation differs"}
            seen["excused"] += i in machine
            if i not in machine:
                problems.append(f"message {i}: observation")
    return problems


@recordings
def test_a_live_run_through_an_endpoint_reproduces_mints_recorded_runs(tmp_path, capsys):
    """The first two tasks of every subset, through the command; then two that ended in MINT's
    context-length error and one in completion mode, through run_budget."""
    pytest.importorskip("openai")
    subsets = list(mint_tasks.SUBSETS)
    records = {s: recorded(s) for s in subsets}
    endpoint = Scripted(script([r for s in subsets for r in records[s].values()]))
    try:
        agent.main(["--api", endpoint.url, "--tasks", "all", "--limit", "2", "--budget", "max5_p2",
                    "--mint_dir", MINT_DIR, "--out", str(tmp_path / "chat"), "--episodes", "8"])
        last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        network, seen = 0, {"compared": 0, "excused": 0}
        for s in subsets:
            ours = read(agent.results_path(str(tmp_path / "chat"), "scripted", "max5_p2", s))
            assert sorted(r["task"]["task_id"] for r in ours) == [t.id for t in mint_tasks.load(MINT_DIR, s)[:2]]
            tasks = {t.id: t for t in mint_tasks.load(MINT_DIR, s)}
            for r in ours:
                tid = r["task"]["task_id"]
                assert same_as_recorded(r, records[s][tid], tasks[tid], seen) == [], (s, tid)
                network += sum(bool(t["network_calls"]) for t in r["turns"])
        assert network >= 4  # hotpotqa's first two call wikipedia_search (offline here)
        # theoremqa 2's sympy tracebacks differ here from MINT's machine (docs/agents.md); the rest are MINT's
        assert seen["compared"] == 30 and seen["excused"] <= 5, seen
        want = [{"task": s, "budget": "max5_p2", "tasks": 2,
                 "successes": sum(records[s][t.id]["state"]["success"] for t in mint_tasks.load(MINT_DIR, s)[:2])}
                for s in subsets]
        assert [{k: r[k] for k in ("task", "budget", "tasks", "successes")} for r in last["results"]] == want
        chats = [r for r in endpoint.requests if r["path"] == "/v1/chat/completions"]
        assert all(r["messages"][0] == {"role": "system", "content": ""} and r["max_tokens"] == 512 and
                   r["temperature"] == 0 and r["stop"] == agent.STOP for r in chats)

        # MINT's "error" where the context overflowed, and MINT's completion prompt
        errors = {"math": [mint_tasks.load(MINT_DIR, "math")[7]], "mmlu": [mint_tasks.load(MINT_DIR, "mmlu")[5]]}
        completion = agent.ApiModel(endpoint.url, completion_mode=True)
        summary = agent.run_budget(completion, errors, "max5_p2", str(tmp_path / "completion"), episodes=2)
        assert [(r["task"], r["tasks"], r["errors"]) for r in summary] == [("math", 1, 1), ("mmlu", 1, 1)]
        for s in errors:
            [ours] = read(agent.results_path(str(tmp_path / "completion"), "scripted", "max5_p2", s))
            assert same_as_recorded(ours, records[s][ours["task"]["task_id"]], errors[s][0], seen) == []
            assert ours["state"]["error"].startswith("InvalidRequestError\n")
            assert "maximum context length" in ours["state"]["error"]
        prompts = [r["prompt"] for r in endpoint.requests if r["path"] == "/v1/completions"]
        assert prompts and all(p.startswith("\n\nHuman: You are a helpful assistant") and p.endswith(
            "\n\nAssistant:") and "\n\nSystem" not in p for p in prompts)
    finally:
        endpoint.shutdown()


# Through our engine: a tiny chat model whose tokens are forced to these replies (the model still
# runs every step; its own argmax is kept to compare meshes). Three tasks of tests/mint_layout,
# max2_p2; gsm8k 0's first cell sleeps 2 s.
LAYOUT = os.path.join(ROOT, "tests", "mint_layout")
SCRIPT = {
    "What is 6 times 7?": ["<thought> Compute, slowly. </thought>\n<execute>\nimport time\ntime.sleep(2)\n"
                           "print(6 * 7)\n</execute>", "The answer is <solution> 42 </solution>."],
    "What is 10 minus 13?": ["<execute>\nx = 10 - 13\nprint(x)\n</execute>", "<solution> -3 </solution>"],
    "Return a + b.": ["<execute>\ndef add(a, b):\n    return a - b\nprint(add(2, 3))\n</execute>",
                      "<solution>\ndef add(a, b):\n    return a + b\n</solution>"],
}
CFG = model.Config(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=2048,
                   dtype="float32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(params, tokenizer): a random tiny Llama with Lemur-Chat's vocabulary (byte fallback, so any
    reply encodes), its output scaled so its argmax never sees near-ties."""
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(["word", "text", "of", "the", "data", "print", "solution"], 6)) for _ in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=300,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("tiny") / "spm.model"
    path.write_bytes(buf.getvalue())
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    return {**params, "output": params["output"] * 30}, chat.chat_tokenizer(str(path))


class Forced(decode.Engine):
    """An engine that emits the script's tokens: each joining prompt is matched to its task (by its
    prompt) and turn (by the observations in it); `chosen` keeps what the model itself picked."""

    def __init__(self, *args, prompts, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts, self.forced, self.chosen = prompts, {}, {}

    def join(self, slot, prompt, *args, **kwargs):
        text = self.prompts.text(list(prompt))
        key = next(k for k in SCRIPT if k in text)
        turn = text.count("Observation:\n")
        reply = self.prompts.tokenizer.encode(SCRIPT[key][turn]) + [self.prompts.tokenizer.added["<|im_end|>"]]
        self.forced[slot] = (key, turn, reply)
        super().join(slot, prompt, *args, **kwargs)

    def _emit(self, slot, token):
        key, turn, reply = self.forced[slot]
        self.chosen.setdefault((key, turn), []).append(int(token))
        return super()._emit(slot, reply[len(self.rows[slot]["out"])])


def engine_run(tiny, out, mesh_shape=(1, 1, 1), episodes=8):
    """The three scripted tasks at max2_p2 through our engine: (records by task, the engine)."""
    params, tokenizer = tiny
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)])
    prompts = Prompts(tokenizer)
    engine = Forced(decode.reshard(params, CFG, mesh), CFG, mesh, slots=episodes, context=2048,
                    vocab_size=tokenizer.vocab_size, prompts=prompts)
    service = server.Service(server.Scheduler(engine, queue=64), prompts, "tiny")
    tasks = {"gsm8k": mint_tasks.load(LAYOUT, "gsm8k"), "humaneval": mint_tasks.load(LAYOUT, "humaneval")}
    with agent.scheduling(service):
        summary = agent.run_budget(agent.EngineModel(service), tasks, "max2_p2", str(out), episodes=episodes)
    records = {(s, r["task"]["task_id"]): r for s in tasks for r in read(agent.results_path(str(out), "tiny",
                                                                                            "max2_p2", s))}
    return summary, records, engine


def outcome(records):
    """What must not depend on the mesh or the batching: each record but its timings and steps."""
    return {k: (r["state"], r["task"], [{f: t[f] for f in ("prompt_tokens", "completion_tokens", "finish_reason",
                                                            "network_calls")} for t in r["turns"]])
            for k, r in records.items()}


@pytest.fixture(scope="module")
def one_device(tiny, tmp_path_factory):
    return engine_run(tiny, tmp_path_factory.mktemp("one_device"))


def test_engine_runs_really_run_the_shells_and_send_mints_requests(one_device):
    summary, records, engine = one_device
    assert [(r["task"], r["tasks"], r["successes"]) for r in summary] == [("gsm8k", 2, 1), ("humaneval", 1, 1)]
    slow = records[("gsm8k", 0)]
    assert slow["state"]["history"][2]["content"].startswith("Observation:\n42\n")  # the cell ran
    assert slow["state"]["history"][1]["content"] == "Assistant:\n" + SCRIPT["What is 6 times 7?"][0] + "\n"
    assert records[("humaneval", 0)]["state"]["history"][2]["content"].startswith("Observation:\n-1\n")
    assert records[("gsm8k", 1)]["state"]["terminate_reason"] == "max_steps"  # MINT: -3 never matches
    for r in records.values():
        assert [t["finish_reason"] for t in r["turns"]] == ["stop", "stop"]
        assert r["state"]["token_counter"]["completion_tokens"] == sum(t["completion_tokens"] for t in r["turns"])


def test_a_mesh_runs_what_one_device_runs(one_device, tiny, tmp_path):
    _, records, engine = one_device
    _, mesh_records, mesh_engine = engine_run(tiny, tmp_path, mesh_shape=(1, 2, 2))
    assert outcome(mesh_records) == outcome(records)
    assert mesh_engine.chosen == engine.chosen  # the model's own tokens, every row, every turn


def test_two_episodes_at_a_time_give_what_eight_give_and_a_sleeping_cell_holds_no_one(one_device, tiny, tmp_path):
    _, records, _ = one_device
    _, two, _ = engine_run(tiny, tmp_path, episodes=2)
    assert outcome(two) == outcome(records)
    for run in (records, two):  # other replies decoded while gsm8k 0's first cell slept
        slow = run[("gsm8k", 0)]["turns"]
        asleep = (slow[0]["decode_steps"][1], slow[1]["decode_steps"][0])
        others = [t["decode_steps"] for k, r in run.items() if k != ("gsm8k", 0) for t in r["turns"]]
        assert any(asleep[0] < first < asleep[1] for first, _ in others), (asleep, others)


class Canned:
    """A model that proposes the same answer to every task, counting its calls."""
    name = "canned"

    def __init__(self):
        self.calls = 0

    def complete(self, messages):
        self.calls += 1
        return agent.Reply("<solution> 42 </solution>  \n", 10, 5, "stop")


def test_a_run_resumes_after_a_kill_and_refuses_other_settings(tmp_path):
    tasks = {"gsm8k": mint_tasks.load(LAYOUT, "gsm8k"), "mmlu": mint_tasks.load(LAYOUT, "mmlu")}
    settings = {"model": "canned", "temperature": 0}
    first = agent.run_budget(Canned(), tasks, "max1_p1", str(tmp_path), settings=settings)
    path = agent.results_path(str(tmp_path), "canned", "max1_p1", "gsm8k")
    lines = read(path)
    assert lines[0]["state"]["history"][1]["content"] == "Assistant:\n<solution> 42 </solution>\n"  # right-stripped
    with open(path, "rb+") as f:  # killed while writing its second line
        f.truncate(len(json.dumps(lines[0])) + 1 + 20)
    again = Canned()
    assert agent.run_budget(again, tasks, "max1_p1", str(tmp_path), settings=settings) == first
    assert again.calls == 1 and read(path) == lines[:1] + [read(path)[1]] and len(read(path)) == 2
    with pytest.raises(ValueError, match=r"run\.json: temperature was 0, this run's is 0\.7"):
        agent.run_budget(Canned(), tasks, "max1_p1", str(tmp_path), settings={**settings, "temperature": 0.7})
