"""Lemur as an agent: MINT runs of our models (batched on a mesh) or of any OpenAI-compatible
endpoint, and replay of MINT's recorded runs.

    python -m evaluation.agent out/tiny_chat --tasks gsm8k,humaneval --budget max5_p2 --mint_dir mint-bench --out runs
    python -m evaluation.agent gs://BUCKET/Lemur-70B-Chat --mesh=1,1,8 --tasks all \
        --budgets max1_p1,max2_p2,max3_p2,max4_p2,max5_p2 --mint_dir mint-bench --out runs    # on every host
    python -m evaluation.agent --api http://127.0.0.1:8000/v1 [--model NAME] [--completion_mode] \
        --tasks all --budget max5_p2 --mint_dir mint-bench --out runs                       # vLLM, our server, ...
    python -m evaluation.agent --replay $(find mint-bench/data/outputs -name results.jsonl)  # conformance

A live run is MINT's loop (mint/main.py and the open-model agent mint/agents/vllm_agent.py at
856af63) over our environment (evaluation/mint_env.py): each turn sends the episode's history
after an empty system message, with MINT's five stop strings, max_tokens 512 and temperature 0,
and steps the episode with the reply right-stripped. Chat mode (the default, MINT's `chat_mode`)
renders the conversation with the model's chat format; --completion_mode sends MINT's `\\n\\nHuman:
...` / `\\n\\nAssistant: ...` prompt ending in `\\n\\nAssistant:` to the completions endpoint. A prompt
that cannot fit the context with 512 tokens after it ends the episode as MINT's "error". The
network tool (wikipedia_search) answers that search is unavailable, unless --wikipedia asks
Wikipedia as MINT did; either way each turn that called it is flagged in the results.

Up to --episodes episodes run at once, each in its own thread with its own shell (started at its
first <execute>, closed when it ends). With MODEL, their requests go to the server's scheduler
(evaluation/server.py) in this process: continuous batching on the mesh, so an episode whose cell
is running holds no one, and a finished episode's place is taken by the next task. Multi-host:
start the same command on every host; process 0 runs the episodes and writes, the others run the
same engine steps. With --api, the endpoint batches (as vLLM and our server do).

Output, under --out, in MINT's layout so MINT's analysis reads it: `<out>/<model>/F=None/<budget>+
tool+cd/<kind>/<subset>/results.jsonl` (a line per episode as MINT writes it, written as each
ends, plus `turns`: per turn the tokens, the finish reason, network calls and seconds in the model
and the environment), `run.json` beside it (the settings). An interrupted run resumes where it
stopped: tasks already in results.jsonl are skipped, as MINT does, and a run with other settings
into the same folder is refused. It prints a table of success rates and, last, a JSON line
`{"results": [{"task", "budget", "tasks", "successes", "rate", "errors", "network_turns"}, ...]}`.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time

import jax

import config
import sharding
from evaluation import mint_env, mint_replay, mint_tasks, server
from evaluation.openai_api import context_error, options
from formats.readers import optional

log = logging.getLogger("evaluation.agent")

# MINT's open-model agent (mint/agents/vllm_agent.py at 856af63)
STOP = ["\nObservation:", "\nExpert feedback:", "\nTask:", "\n---", "\nHuman:"]
MAX_TOKENS = 512
OFFLINE = ("wikipedia_search is unavailable: this evaluation runs without network access. "
           "Answer from what you know.")


def budget(text: str) -> tuple[int, int]:
    """MINT's budget name -> (max_steps, max_propose): "max5_p2" -> (5, 2)."""
    match = re.fullmatch(r"max(\d+)_p(\d+)", text)
    if not match or not 0 < int(match.group(2)) <= int(match.group(1)):
        raise ValueError(f"--budget {text!r}: must be maxN_pK with 0 < K <= N, as MINT's max5_p2")
    return int(match.group(1)), int(match.group(2))


def completion_prompt(messages: list) -> str:
    """MINT's prompt for a completions endpoint: the system message dropped."""
    turns = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{turns[m['role']]}: {m['content']}" for m in messages if m["role"] in turns) + "\n\nAssistant:"


class ContextFull(Exception):
    """The prompt with MINT's max_tokens after it does not fit the model's context."""


@dataclasses.dataclass
class Reply:
    text: str  # as the model wrote it, cut at a stop string
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    decode_steps: list | None = None  # the engine's decode step of the reply's first and last token


class EngineModel:
    """A model of this project in this process: each reply a request to the server's scheduler,
    whose engine decodes the replies of all running episodes together."""

    def __init__(self, service, completion_mode: bool = False):
        self.service, self.completion_mode, self.name = service, completion_mode, service.name
        if not completion_mode and not service.prompts.can_chat:
            raise ValueError(f"{service.name}: the model has no chat format; use --completion_mode")

    def complete(self, messages: list) -> Reply:
        prompts, context = self.service.prompts, self.service.context
        kind = "text" if self.completion_mode else "chat"
        body = {"max_tokens": MAX_TOKENS, "temperature": 0, "stop": STOP}
        if self.completion_mode:
            prompt = prompts.completion({**body, "prompt": completion_prompt(messages)})
        else:
            prompt = prompts.chat({**body, "messages": messages})
        if len(prompt) + MAX_TOKENS > context:
            raise ContextFull(context_error(context, len(prompt), MAX_TOKENS, "prompt" if self.completion_mode
                                            else "messages").message)
        request = server.Request(kind, prompt, options(body, not self.completion_mode),
                                 prompts.stop_tokens(kind == "chat"), prompts)
        self.service.scheduler.submit(request)
        text, finish = "", None
        while finish is None:
            delta, finish, error = request.events.get()
            if error:
                raise error
            text += delta
        steps = [request.steps[0], request.steps[-1]] if request.steps else None
        return Reply(text, len(prompt), len(request.steps), finish, steps)


class ApiModel:
    """Any OpenAI-compatible endpoint (vLLM, our server, ...) through OpenAI's client, as MINT's
    agent calls it: chat completions, or completions with --completion_mode."""

    def __init__(self, base_url: str, name: str | None = None, completion_mode: bool = False):
        self.openai = optional("openai", "run MINT against an OpenAI-compatible endpoint (pip install openai)")
        # the key from OPENAI_API_KEY, else "EMPTY" as MINT sends; a busy server is retried, as MINT's backoff does
        self.client = self.openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                                         max_retries=8, timeout=600)
        self.completion_mode = completion_mode
        try:
            self.name = name or self.client.with_options(max_retries=1).models.list().data[0].id
        except self.openai.APIError as e:
            raise ConnectionError(f"--api {base_url}: cannot list its models ({e})") from None

    def complete(self, messages: list) -> Reply:
        common = dict(model=self.name, max_tokens=MAX_TOKENS, temperature=0, stop=STOP)
        try:
            if self.completion_mode:
                response = self.client.completions.create(prompt=completion_prompt(messages), **common)
                text = response.choices[0].text
            else:
                response = self.client.chat.completions.create(messages=messages, **common)
                text = response.choices[0].message.content or ""
        except self.openai.BadRequestError as e:
            if "maximum context length" in str(e):  # vLLM's wording, which MINT matches on too
                raise ContextFull(str(e)) from None
            raise
        usage = response.usage
        return Reply(text, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                     response.choices[0].finish_reason)


def run_episode(model, task: mint_tasks.Task, max_steps: int, max_propose: int, *, wikipedia: bool = False,
                level: str | None = None) -> dict:
    """One task to its end, MINT's way: a line of results.jsonl, with `turns`."""
    calls = []

    def search(query, *args):
        calls.append(query)
        return mint_env.wikipedia_search(query, *args) if wikipedia else OFFLINE

    episode = mint_env.Episode(task, max_steps, max_propose, tools={"wikipedia_search": search}, level=level)
    usage, turns = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, []
    try:
        while not episode.finished:
            start = time.perf_counter()
            try:
                reply = model.complete([{"role": "system", "content": ""}] + episode.history)
            except ContextFull as e:
                episode.step("", error=f"InvalidRequestError\n{e}")
                turns.append({"error": "context", "model_seconds": round(time.perf_counter() - start, 3)})
                break
            thought = time.perf_counter()
            before = len(calls)
            episode.step(reply.text.rstrip())
            usage["prompt_tokens"] += reply.prompt_tokens
            usage["completion_tokens"] += reply.completion_tokens
            usage["total_tokens"] += reply.prompt_tokens + reply.completion_tokens
            turns.append({"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "finish_reason": reply.finish_reason, "network_calls": len(calls) - before,
                          "decode_steps": reply.decode_steps, "model_seconds": round(thought - start, 3),
                          "environment_seconds": round(time.perf_counter() - thought, 3)})
    finally:
        episode.close()
    episode.token_counter.update(usage)
    return {**episode.record(), "turns": turns}


def results_path(out: str, model_name: str, budget_name: str, subset: str) -> str:
    """Where MINT puts the results of one subset and budget (F=None: no language feedback)."""
    name = re.sub(r"[^\w.+-]+", "_", model_name.rstrip("/").split("/")[-1]) or "model"
    return os.path.join(out, name, "F=None", f"{budget_name}+tool+cd", mint_tasks.SUBSETS[subset][0], subset,
                        "results.jsonl")


def resume(path: str, settings: dict) -> list[dict]:
    """The records already in `path` (a line cut short by a kill is dropped, and said), after
    checking the folder's run.json holds these settings; writes run.json for a new folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run_json = os.path.join(os.path.dirname(path), "run.json")
    if os.path.exists(run_json):
        with open(run_json, encoding="utf-8") as f:
            before = json.load(f)
        for key in sorted(set(before) | set(settings)):
            if before.get(key) != settings.get(key):
                raise ValueError(f"{run_json}: {key} was {before.get(key)!r}, this run's is {settings.get(key)!r}; "
                                 f"give another --out (or remove that folder) to run with other settings")
    else:
        with open(run_json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)
        os.replace(run_json + ".tmp", run_json)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        log.warning("%s: dropping its last line, cut short (%d bytes): that task runs again", path,
                    len(data) - len(whole))
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return [json.loads(line) for line in whole.decode("utf-8").splitlines() if line.strip()]


def rates(records: list[dict], subset: str, budget_name: str) -> dict:
    successes = sum(r["state"]["success"] for r in records)
    return {"task": subset, "budget": budget_name, "tasks": len(records), "successes": successes,
            "rate": round(successes / len(records), 3) if records else None,
            "errors": sum(r["state"]["terminate_reason"] == "error" for r in records),
            "network_turns": sum(bool(t.get("network_calls")) for r in records for t in r.get("turns", []))}


def run_budget(model, tasks: dict, budget_name: str, out: str, *, episodes: int = 16, wikipedia: bool = False,
               level: str | None = None, settings: dict | None = None) -> list[dict]:
    """Every task of `tasks` ({subset: [Task]}) under one budget, `episodes` at a time, each
    record appended to its subset's results.jsonl as it ends; a summary per subset."""
    max_steps, max_propose = budget(budget_name)
    settings = {**(settings or {}), "budget": budget_name}
    files, done, todo = {}, {}, []
    for subset, subset_tasks in tasks.items():
        path = results_path(out, model.name, budget_name, subset)
        done[subset] = resume(path, {**settings, "subset": subset})
        finished = {r["task"]["task_id"] for r in done[subset]}
        left = [t for t in subset_tasks if t.id not in finished]
        todo += left
        files[subset] = open(path, "a", encoding="utf-8")
        if finished:
            log.info("%s: %d tasks done before, %d to run", path, len(subset_tasks) - len(left), len(left))
    lock = threading.Lock()

    def one(task):
        record = run_episode(model, task, max_steps, max_propose, wikipedia=wikipedia, level=level)
        with lock:
            files[task.subset].write(json.dumps(record) + "\n")
            files[task.subset].flush()
            done[task.subset].append(record)
        log.info("%s %s %s: %s (%s)", budget_name, task.subset, task.id, "success" if record["state"]["success"]
                 else "failure", record["state"]["terminate_reason"])

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, min(episodes, len(todo)))) as pool:
            futures = [pool.submit(one, task) for task in todo]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()  # a bug or a broken endpoint: stop taking tasks, say it
            except BaseException:  # that, or Ctrl-C: the running episodes end and are written, no others start
                for f in futures:
                    f.cancel()
                log.warning("stopping: the %d running episodes end first (and are written)",
                            sum(not f.done() for f in futures))
                raise
    finally:
        for f in files.values():
            f.close()
    asked = {subset: {t.id for t in subset_tasks} for subset, subset_tasks in tasks.items()}
    return [rates([r for r in done[subset] if r["task"]["task_id"] in asked[subset]], subset, budget_name)
            for subset in tasks]


def load_tasks(mint_dir: str, names: str, limit: int | None) -> dict:
    """{subset: its tasks (the first `limit`)} for --tasks (comma-separated subsets, or "all")."""
    subsets = list(mint_tasks.SUBSETS) if names == "all" else [s.strip() for s in names.split(",") if s.strip()]
    unknown = [s for s in subsets if s not in mint_tasks.SUBSETS]
    if unknown or not subsets:
        raise ValueError(f"--tasks: {', '.join(unknown) or names!r} unknown; MINT's subsets: "
                         f"{', '.join(mint_tasks.SUBSETS)} (or all)")
    return {s: mint_tasks.load(mint_dir, s)[:limit] for s in subsets}


def table(results: list[dict]) -> str:
    lines = ["| budget | task | tasks | successes | rate | errors | network turns |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['budget']} | {r['task']} | {r['tasks']} | {r['successes']} | "
              f"{'-' if r['rate'] is None else format(r['rate'], '.3f')} | {r['errors']} | {r['network_turns']} |"
              for r in results]
    return "\n".join(lines)


def replay(paths: list, mint_dir: str | None, level: str | None, jobs: int):
    """--replay: each file through our environment, a line per file and a JSON summary last."""
    keys = ("trajectories", "success_agree", "terminate_agree", "observations_compared", "observations_equal",
            "network_turns", "server_errors")
    total = {key: 0 for key in keys} | {"files": [], "disagreements": []}
    for path in paths:
        summary = mint_replay.replay_file(path, mint_dir, level, jobs)
        where = mint_replay.layout(path)
        name = f"max{where['max_steps']}_p{where['max_propose']}/{where['subset']}"
        print(f"{name}: {summary['success_agree']}/{summary['trajectories']} success verdicts agree, "
              f"{summary['terminate_agree']} terminate reasons, observations {summary['observations_equal']}/"
              f"{summary['observations_compared']} equal ({summary['network_turns']} network turns, "
              f"{summary['server_errors']} server errors apart); successes recorded "
              f"{summary['recorded_successes']}, replayed {summary['replayed_successes']}", flush=True)
        for key in keys:
            total[key] += summary[key]
        total["files"].append({"file": name, **{k: summary[k] for k in keys},
                               "recorded_successes": summary["recorded_successes"],
                               "replayed_successes": summary["replayed_successes"]})
        total["disagreements"] += [{"file": name, **d} for d in summary["disagreements"]]
    print(json.dumps(total))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", metavar="MODEL",
                        help="training out_dir, checkpoint or Hugging Face directory")
    parser.add_argument("--api", metavar="BASE_URL", help="an OpenAI-compatible endpoint instead of MODEL, e.g. "
                                                          "http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="with --api: the model's name there (default: the first it lists)")
    parser.add_argument("--completion_mode", action="store_true", help="MINT's Human/Assistant prompt to completions")
    parser.add_argument("--tasks", default="all", help="comma-separated MINT subsets, or all")
    parser.add_argument("--budget", default="max5_p2", help="MINT's budget: max_steps and proposals, e.g. max5_p2")
    parser.add_argument("--budgets", help="several budgets, run in turn (the per-k curve): max1_p1,...,max5_p2")
    parser.add_argument("--limit", type=int, help="the first N tasks of each subset")
    parser.add_argument("--mint_dir", default=os.environ.get("MINT_DIR"),
                        help="a MINT checkout or a folder in its layout (default: $MINT_DIR)")
    parser.add_argument("--out", help="where results go, in MINT's layout")
    parser.add_argument("--episodes", type=int, default=16, help="episodes run at once")
    parser.add_argument("--mesh", help="DATA,FSDP,TENSOR over all devices of all processes (default: one device)")
    parser.add_argument("--slots", type=int, help="rows decoded together (default: --episodes)")
    parser.add_argument("--context", type=int, default=4096, help="prompt + reply tokens (MINT served Lemur at 4096)")
    parser.add_argument("--dtype", help="compute dtype instead of the model's")
    parser.add_argument("--wikipedia", action="store_true", help="answer wikipedia_search from Wikipedia, as MINT")
    parser.add_argument("--level", help="the sandbox's isolation level (default: the strongest available)")
    parser.add_argument("--replay", nargs="+", metavar="RESULTS.jsonl", help="MINT results files to replay through "
                                                                            "our environment")
    parser.add_argument("--jobs", type=int, default=2, help="--replay: episodes replayed at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.replay:
        return replay(args.replay, args.mint_dir, args.level, args.jobs)
    if (args.path is None) == (args.api is None):
        parser.error("give MODEL or --api BASE_URL (or --replay FILES)")
    if not args.mint_dir or not args.out:
        parser.error("live runs need --mint_dir (a MINT checkout: git clone https://github.com/xingyaoww/mint-bench) "
                     "and --out")
    if args.episodes < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--episodes and --limit must be at least 1")
    budgets = (args.budgets or args.budget).split(",")
    for name in budgets:
        budget(name)
    tasks = load_tasks(args.mint_dir, args.tasks, args.limit)
    settings = {"model": args.path, "api": args.api, "completion_mode": args.completion_mode, "max_tokens": MAX_TOKENS,
                "temperature": 0, "stop": STOP, "wikipedia": args.wikipedia,
                "context": None if args.api else args.context, "dtype": None if args.api else args.dtype}
    if args.api:
        model = ApiModel(args.api, args.model, args.completion_mode)
        return finish(run_all(model, tasks, budgets, args, {**settings, "model": model.name}))
    return in_process(args, tasks, budgets, settings)


def run_all(model, tasks: dict, budgets: list, args, settings: dict) -> list[dict]:
    results = []
    for name in budgets:
        results += run_budget(model, tasks, name, args.out, episodes=args.episodes, wikipedia=args.wikipedia,
                              level=args.level, settings=settings)
    return results


def in_process(args, tasks: dict, budgets: list, settings: dict):
    """MODEL on this process's mesh: the server's scheduler in a thread, the episodes beside it
    (process 0); every other process runs the same engine steps."""
    sharding.select_platforms()
    mesh = config.command_mesh(args.mesh)
    service = server.load(args.path, mesh, args.slots or args.episodes, args.context, queue=max(64, args.episodes),
                          dtype=args.dtype)
    if jax.process_index() != 0:
        service.scheduler.follow()
        return
    with scheduling(service):
        results = run_all(EngineModel(service, args.completion_mode), tasks, budgets, args, settings)
    c = service.scheduler.engine.counts
    log.info("the engine ran %d decode steps and %d prefill chunks for %d tokens", c["decode_steps"],
             c["prefill_steps"], c["tokens"])
    return finish(results)


@contextlib.contextmanager
def scheduling(service):
    """The service's scheduler running in a thread (process 0's loop), stopped on the way out."""
    thread = threading.Thread(target=service.scheduler.run, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.scheduler.shutdown()
        thread.join()


def finish(results: list[dict]):
    print(table(results))
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    sys.exit(config.command(main))
