"""What continuous batching buys: output tokens/s of the OpenAI server (evaluation/server.py) on the
tiny model with 1 and with 8 concurrent clients, time to first token, and beside them what a user
has without this server: transformers' `generate` on the exported model answering the same
requests one by one.

    python bench/serve.py                  # the tiny model's shape (model.TINY), 8 requests of 128 tokens
    python bench/serve.py --tokens 64      # shorter replies
    python bench/serve.py --smoke          # tiny sizes (tests/test_bench.py runs it)

The model is model.TINY's shape with random weights and a sentencepiece vocabulary trained on
generated text, exported as `tools.convert` exports a chat run (a Hugging Face directory with the
ChatML template); byte pieces, eos and <|im_end|> are kept from being the argmax so every reply
runs to its max_tokens (the same work on every side). All sides decode greedily in fp32, in one
process on the same cores: the server in threads (`server.running`, one device, --slots 8), the
clients with the `openai` package, streaming (time to first token: from sending a request to its
first text). "1 client" sends the 8 requests one after another, "8 clients" all at once. The
last line is one JSON object of the figures.
"""
import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

QUESTIONS = ["word3 text", "the data of word7 text 12", "hi", "text 5 of the data word1 word2 word3 text 9",
             "word9", "of the data", "word12 text 40 of", "data data data text word30 of the text 8 word4"]


def export_model(path: str, cfg, pieces: int):
    """A random model of cfg's shape and a chat tokenizer of `pieces` sentencepiece pieces, exported."""
    import jax
    import numpy as np
    import sentencepiece as spm

    import chat
    import model
    from formats import hf
    rng = np.random.default_rng(0)
    words = ["word", "text", "of", "the", "data", "system", "user", "assistant", "be", "brief", "hi", "reads"]
    lines = [" ".join(rng.choice(words, 6)) + f" {i}" for i in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   vocab_size=pieces, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, pad_id=-1, minloglevel=2)
    with open(os.path.join(path, "spm.model"), "wb") as f:
        f.write(buf.getvalue())
    tokenizer = chat.chat_tokenizer(os.path.join(path, "spm.model"))
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    quiet = [i for i in range(pieces) if tokenizer.sp.is_byte(i)] + list(range(tokenizer.vocab_size, cfg.vocab_size)) + [
        tokenizer.eos_id, tokenizer.added["<|im_end|>"]]
    hf.save_hf({**params, "output": params["output"].at[:, quiet].set(0.0) * 30}, cfg, path, dtype="float32")
    tokenizer.save(path, chat.CHAT_TEMPLATE)


def ask(client, question, tokens):
    """(text, tokens, seconds to the first text, seconds in all) of one streamed chat request."""
    start, first, text, usage = time.perf_counter(), None, "", None
    for c in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=tokens, stream=True,
                                            stream_options={"include_usage": True}):
        if c.choices and c.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text += c.choices[0].delta.content
        usage = c.usage or usage
    return text, usage.completion_tokens, first, time.perf_counter() - start


def clients(client, n_tokens, concurrent: bool) -> dict:
    results = [None] * len(QUESTIONS)
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(client, QUESTIONS[i], n_tokens)))
                   for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        results = [ask(client, q, n_tokens) for q in QUESTIONS]
    wall = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    ttft = sorted(r[2] for r in results)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_median_ms": round(1000 * ttft[len(ttft) // 2], 1), "ttft_max_ms": round(1000 * ttft[-1], 1),
            "texts": [r[0] for r in results]}


def transformers_one_by_one(path, n_tokens) -> dict:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    with torch.no_grad():
        theirs.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start, texts, tokens = time.perf_counter(), [], 0
        for ids in prompts:
            out = theirs.generate(torch.tensor([ids]), max_new_tokens=n_tokens, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)[0, len(ids):].tolist()
            tokens += len(out)
            texts.append(tokenizer.decode(out, skip_special_tokens=True))
    wall = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1), "texts": texts}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each request")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    import dataclasses

    import jax
    import openai

    import model
    import sharding
    from evaluation import server
    cfg = dataclasses.replace(model.TINY, dtype="float32")
    pieces, tokens = 1000, args.tokens
    if args.smoke:
        cfg = dataclasses.replace(cfg, vocab_size=320, dim=64, n_layers=2, ffn_dim=128)
        pieces, tokens = 300, 8
    with tempfile.TemporaryDirectory() as path:
        export_model(path, cfg, pieces)
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        service = server.load(path, mesh, slots=8, context=cfg.max_seq_len, name="tiny", dtype="float32")
        with server.running(service) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            for q in QUESTIONS:  # compiles the decode step and the prefill chunk sizes of these prompts
                ask(client, q, 2)
            one, before = clients(client, tokens, concurrent=False), dict(service.scheduler.engine.counts)
            eight = clients(client, tokens, concurrent=True)
            after = service.scheduler.engine.counts
        hf_side = transformers_one_by_one(path, tokens)
    steps = after["decode_steps"] - before["decode_steps"]
    print(f"{len(QUESTIONS)} chat requests of {tokens} tokens, greedy, fp32; model.TINY's shape "
          f"({model.param_count(cfg) / 1e6:.1f}M params), {os.cpu_count()} CPU cores")
    print("| side | output tokens/s | seconds | time to first token (median / max) |")
    print("| --- | --- | --- | --- |")
    for name, r in (("server, 1 client (one after another)", one), ("server, 8 concurrent clients", eight)):
        print(f"| {name} | {r['tokens_per_s']} | {r['seconds']} | {r['ttft_median_ms']} / {r['ttft_max_ms']} ms |")
    print(f"| transformers generate, one by one | {hf_side['tokens_per_s']} | {hf_side['seconds']} | - |")
    speedup = eight["tokens_per_s"] / one["tokens_per_s"]
    print(f"8 clients / 1 client: {speedup:.2f}x; {eight['tokens']} tokens in {steps} decode steps "
          f"({eight['tokens'] / steps:.1f} rows a step); replies equal with 1 and 8 clients: "
          f"{one['texts'] == eight['texts']}, equal to transformers': "
          f"{sum(a == b for a, b in zip(one['texts'], hf_side['texts']))}/{len(QUESTIONS)}")
    result = {"one_client": {k: v for k, v in one.items() if k != "texts"},
              "eight_clients": {k: v for k, v in eight.items() if k != "texts"},
              "transformers_one_by_one": {k: v for k, v in hf_side.items() if k != "texts"},
              "speedup_8_vs_1": round(speedup, 2), "decode_steps_8_clients": steps,
              "same_replies": one["texts"] == eight["texts"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
