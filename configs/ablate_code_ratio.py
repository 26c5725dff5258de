# The paper's question on the built-in corpus: how the code share of continued pretraining trades
# code against text. One point per code weight (text weight 1) and seed, each 440 steps of 16 x 256
# tokens (the same 1.8M tokens per point), about 22 minutes for the 15 points on 2 CPU cores:
#   python -m tools.ablate configs/ablate_code_ratio.py --set sources.code.weight=0,0.3,1,3,10 \
#       --set seed=0,1,2 --sweep_dir out/ablate_code_ratio
#   python bench/tradeoff.py out/ablate_code_ratio
# Weight 0 trains on text only (code is still evaluated); 10 is the paper's 10:1 (91% code). The
# model is the demo's at half the width and half the depth (1.0M params; the demo's has 6.3M), so
# that each point sees enough tokens in the time: with fewer, a little text helped code more than
# more code did. Past 3:1 the code loss stops improving at this scale (BENCHMARKS.md, section 4).
import dataclasses

import model
from config import TrainConfig
from formats import demo

sources, tokenizer = demo.corpus(demo.cache_dir("out/tiny"))  # code.jsonl and text.jsonl, built once

config = TrainConfig(
    out_dir="out/ablate_code_ratio/run",  # ablate.py gives each point its own
    model=dataclasses.replace(model.TINY, dim=128, ffn_dim=344, n_layers=4),
    sources=sources,  # Source("code", ..., 10.0), Source("text", ..., 1.0): swept by name
    tokenizer=tokenizer,
    steps=440,
    warmup_steps=40,
    lr=2e-3,
    end_lr=2e-4,
    batch_size=16,
    seq_len=256,
    log_every=10,
    eval_every=40,
    eval_batches=4,  # 16K held-out tokens per source per evaluation; the last 3 are averaged
    checkpoint_every=440,
    keep_checkpoints=1,
)
