"""Loader throughput against plain sentencepiece on the same documents (a benchmark, not a test).

    python bench/data.py                      # demo corpus code source, demo tokenizer (out/demo_data)
    python bench/data.py --tokenizer PATH     # e.g. the Llama-2 tokenizer.model
    python bench/data.py --smoke              # tiny sizes, the demo's 1024-piece tokenizer; tests/test_data.py
                                              # runs it (with --cache: its demo corpus) so it cannot rot

Baseline: the documents of the demo corpus's code file, parsed beforehand (untimed), encoded by one
`SentencePieceProcessor.encode(docs, num_threads=cpu_count)` call. Loader: a `data.Loader` over that
same file (8 streams, seq_len 2048), timed from construction until it has yielded 90% as many tokens
as the baseline produced (about one epoch, 5% being held out): reading, JSON parsing, held-out
hashing, tokenization, packing and the hand-off through the prefetch queue. Last line: one JSON
object with the median rates of --repeats interleaved pairs of runs and the median of the pairs'
loader/baseline ratios as "ratio" (target >= 0.8).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sentencepiece as spm  # noqa: E402

import data  # noqa: E402
from formats import demo  # noqa: E402
from formats.tokenizer import Tokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny corpus share, the demo vocab, short rows")
    parser.add_argument("--tokenizer", default="", help="a sentencepiece model (default: the demo one)")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs; medians are reported")
    parser.add_argument("--cache", help="demo corpus cache (default: out/demo_data, or a temporary one for --smoke)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or (tmp if args.smoke else os.path.join(ROOT, "out", "demo_data"))
        sources, tokenizer = demo.corpus(cache, 1024 if args.smoke else 4096)
        tokenizer = args.tokenizer or tokenizer
        code = sources[0]
        with open(code.paths[0], encoding="utf-8") as f:
            docs = [json.loads(line)[code.field] for line in f]
        if args.smoke:
            docs = docs[:10]

        sp = spm.SentencePieceProcessor(model_file=tokenizer)
        seq_len, batch_size = (128, 4) if args.smoke else (2048, 8)
        sp_rates, loader_rates = [], []
        for _ in range(1 if args.smoke else args.repeats):  # interleaved pairs: the machine may be shared
            start = time.perf_counter()
            sp_tokens = sum(map(len, sp.encode(docs, num_threads=os.cpu_count())))
            sp_rates.append(sp_tokens / (time.perf_counter() - start))

            start = time.perf_counter()
            loader = data.Loader([code], Tokenizer(tokenizer), seq_len, batch_size)
            tokens = 0
            while tokens < sp_tokens * 0.9:
                tokens += next(loader)["tokens"].size
            loader_rates.append(tokens / (time.perf_counter() - start))
            loader.close()

    sp_rate, loader_rate = statistics.median(sp_rates), statistics.median(loader_rates)
    ratio = statistics.median(l / s for l, s in zip(loader_rates, sp_rates))
    print(f"documents: {len(docs)}, sentencepiece: {sp_tokens} tokens, loader: {tokens} tokens")
    print(f"sentencepiece {sp_rate:,.0f} tokens/s, loader {loader_rate:,.0f} tokens/s")
    print(json.dumps({"loader_tokens_per_sec": loader_rate, "sentencepiece_tokens_per_sec": sp_rate,
                      "ratio": ratio, "repeats": len(sp_rates), "tokenizer": os.path.basename(tokenizer),
                      "cpu_count": os.cpu_count(), "smoke": args.smoke}))


if __name__ == "__main__":
    main()
