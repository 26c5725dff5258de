"""What batching episodes buys a live MINT run (evaluation/agent.py): episodes per second with 8
episodes at a time against one at a time, side by side, and where the time goes (prefill, decode,
code execution).

    python bench/agent.py --mint_dir mint-bench --tokenizer llama-2/tokenizer.model   # model.TINY's shape
    python bench/agent.py ... --limit 8    # 8 tasks of each subset (default 4)
    python bench/agent.py --smoke          # tests/mint_layout's tasks, a tiny model (tests/test_bench.py runs it)

--mint_dir: a MINT checkout (its data/outputs hold Lemur-70B-Chat's recorded runs); --tokenizer:
Llama-2's tokenizer.model. The model is model.TINY's shape (8 layers, dim 256) with random weights
over Lemur-Chat's vocabulary (that tokenizer with ChatML's tokens, 4096 positions); its tokens
are forced to the replies Lemur-70B-Chat gave in MINT's recorded runs (max5_p2), so the
episodes take the recorded trajectories: the same prompts, reply lengths and cells as the real
run, while the model computes every prefill chunk and decode step as it would. Each side runs
the same tasks through `agent.run_budget` on one CPU device; the pairs alternate. Time in the
engine is measured around each step (prefill: a joining prompt's chunk; decode: a step of all
rows) and code execution is the episodes' time in the environment (summed over episodes, so it
overlaps the engine's when episodes run at once). The last line is one JSON object.
"""
import argparse
import io
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def tokenizer_of(args):
    import chat
    if not args.smoke:
        return chat.chat_tokenizer(args.tokenizer)
    import numpy as np
    import sentencepiece as spm
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(["print", "solution", "execute", "the", "answer"], 6)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=280,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, pad_id=-1, minloglevel=2)
    path = os.path.join(tempfile.mkdtemp(), "spm.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return chat.chat_tokenizer(path)


def scripts(args, tasks: dict) -> dict:
    """first message -> the replies to force, turn by turn: Lemur-70B-Chat's recorded ones, or
    (--smoke) one cell and a solution."""
    from evaluation import mint_replay, mint_tasks
    out = {}
    for subset, subset_tasks in tasks.items():
        if args.smoke:
            for t in subset_tasks:
                out[mint_tasks.first_message(t, 5, 2)] = ["<execute>\nprint(6 * 7)\n</execute>",
                                                          "<solution> 42 </solution>", "<solution> 42 </solution>"]
            continue
        path = os.path.join(args.mint_dir, "data", "outputs", "lemur-70b-chat-v1", "F=None", "max5_p2+tool+cd",
                            mint_tasks.SUBSETS[subset][0], subset, "results.jsonl")
        with open(path, encoding="utf-8") as f:
            records = {r["task"]["task_id"]: r for r in map(json.loads, f)}
        for t in subset_tasks:
            history = records[t.id]["state"]["history"]
            out[history[0]["content"]] = [mint_replay.assistant_text(m["content"]) for m in history
                                          if m["role"] == "assistant"]
    return out


def forced_engine(script: dict, prompts, tokenizer):
    """decode.Engine whose emitted tokens are the script's (the model still runs every step)."""
    import decode
    start, end = tokenizer.added["<|im_start|>"], tokenizer.added["<|im_end|>"]

    class Forced(decode.Engine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.forced = {}

        def join(self, slot, prompt, *a, **k):
            text = prompts.text(list(prompt))
            replies = next(r for first, r in script.items() if first[-300:] in text)
            turn = (list(prompt).count(start) - 3) // 2  # system, first message, then assistant/user pairs
            self.forced[slot] = tokenizer.encode(replies[turn]) + [end]
            super().join(slot, prompt, *a, **k)

        def _emit(self, slot, token):
            return super()._emit(slot, self.forced[slot][len(self.rows[slot]["out"])])

    return Forced


def timed_steps(totals: dict):
    """decode.step wrapped to add each call's seconds (to its result) to totals[prefill|decode]."""
    import decode
    step = decode.step

    def timed(*args, slot=None, **kwargs):
        begin = time.perf_counter()
        out = step(*args, slot=slot, **kwargs)
        out[0].block_until_ready()
        totals["prefill" if slot is not None else "decode"] += time.perf_counter() - begin
        return out

    decode.step = timed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mint_dir", default=os.environ.get("MINT_DIR"), help="a MINT checkout (default: $MINT_DIR)")
    parser.add_argument("--tokenizer", help="Llama-2's tokenizer.model")
    parser.add_argument("--tasks", default="gsm8k,mbpp")
    parser.add_argument("--limit", type=int, default=4, help="tasks of each subset")
    parser.add_argument("--episodes", type=int, default=8, help="episodes at a time on the batched side")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternated")
    parser.add_argument("--smoke", action="store_true", help="tests/mint_layout's tasks, a tiny model")
    args = parser.parse_args(argv)
    if not args.smoke and not (args.mint_dir and args.tokenizer):
        parser.error("give --mint_dir (a MINT checkout, with Lemur-70B-Chat's recorded runs) and --tokenizer "
                     "(Llama-2's tokenizer.model), or --smoke")

    import jax
    import chat
    import decode
    import model
    import sharding
    from evaluation import agent, server
    from evaluation.openai_api import Prompts
    if args.smoke:
        args.mint_dir, args.tasks, args.limit, args.episodes = os.path.join(ROOT, "tests", "mint_layout"), "gsm8k", 2, 2
    tokenizer = tokenizer_of(args)
    cfg = model.Config(**{**model.TINY.__dict__, "vocab_size": chat.padded_vocab(tokenizer),
                          "max_seq_len": 4096})
    if args.smoke:
        cfg = model.Config(**{**cfg.__dict__, "dim": 64, "n_layers": 2, "ffn_dim": 128})
    tasks = agent.load_tasks(args.mint_dir, args.tasks, args.limit)
    prompts = Prompts(tokenizer)
    Forced = forced_engine(scripts(args, tasks), prompts, tokenizer)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    params = decode.reshard(params, cfg, mesh)
    totals = {"prefill": 0.0, "decode": 0.0}
    timed_steps(totals)

    def run(episodes: int) -> dict:
        engine = Forced(params, cfg, mesh, slots=episodes, context=cfg.max_seq_len, vocab_size=tokenizer.vocab_size)
        service = server.Service(server.Scheduler(engine, queue=64), prompts, "tiny")
        totals.update(prefill=0.0, decode=0.0)
        with tempfile.TemporaryDirectory() as out:
            begin = time.perf_counter()
            with agent.scheduling(service):
                summary = agent.run_budget(agent.EngineModel(service), tasks, "max5_p2", out, episodes=episodes)
            seconds = time.perf_counter() - begin
            records = [r for s in tasks for r in map(json.loads, open(agent.results_path(out, "tiny", "max5_p2", s)))]
        n = sum(r["tasks"] for r in summary)
        assert not any(r["errors"] for r in summary), summary  # every episode must fit the context
        return {"episodes_at_once": episodes, "episodes": n, "seconds": round(seconds, 2),
                "episodes_per_second": round(n / seconds, 4), "prefill_seconds": round(totals["prefill"], 2),
                "decode_seconds": round(totals["decode"], 2), "decode_steps": engine.counts["decode_steps"],
                "prefill_chunks": engine.counts["prefill_steps"], "tokens": engine.counts["tokens"],
                "environment_seconds": round(sum(t.get("environment_seconds", 0) for r in records
                                                 for t in r["turns"]), 2),
                "successes": sum(r["successes"] for r in summary)}

    if not args.smoke:
        run(args.episodes)  # compiles every shape once, outside the figures
    pairs = []
    for _ in range(args.repeats):
        pairs.append((run(1), run(args.episodes)))
        one, many = pairs[-1]
        print(f"one at a time: {one['episodes_per_second']:.3f} episodes/s ({one['seconds']} s); "
              f"{args.episodes} at a time: {many['episodes_per_second']:.3f} ({many['seconds']} s); "
              f"{many['episodes_per_second'] / one['episodes_per_second']:.2f}x", flush=True)
        assert one["successes"] == many["successes"]
    print(json.dumps({"pairs": pairs, "speedup": [round(m["episodes_per_second"] / o["episodes_per_second"], 2)
                                                  for o, m in pairs]}))


if __name__ == "__main__":
    main()
