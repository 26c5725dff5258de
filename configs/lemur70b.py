# Lemur-70B: continued pretraining of Llama-2-70B on 90B tokens, code:text = 10:1 by tokens, on a
# TPU v4-512 (256 chips). Run the same command on every host of the pod (docs/pods.md#launching-on-a-v4-512):
#   python train.py configs/lemur70b.py
# Check that it fits first, on any machine with jax[tpu] installed (compile only):
#   python -m tools.aot configs/lemur70b.py --topology=v4-512
# and the data mixture, on any machine that can read the bucket:
#   python data.py configs/lemur70b.py --batches 20
# Every path is in one Cloud Storage bucket that all hosts read and write (needs
# requirements-cloud.txt); replace BUCKET with yours. The datasets are as Hugging Face distributes
# them, copied into the bucket as docs/data.md#preparing-the-lemur-corpus shows.
from config import Source, TrainConfig

BUCKET = "gs://YOUR_BUCKET"
# The Stack (deduplicated), the scripting languages the paper names, Python the largest share:
# parquet shards data/<language>/data-0000X-of-0000Y.parquet, text in column "content"
STACK_LANGUAGES = ("python", "javascript", "typescript", "php", "ruby", "shell", "perl", "sql", "lua", "r")

config = TrainConfig(
    out_dir=f"{BUCKET}/runs/lemur70b",
    model="llama2_70b",
    init_from=f"hf:{BUCKET}/models/Llama-2-70b-hf",
    tokenizer=f"{BUCKET}/models/Llama-2-70b-hf/tokenizer.model",
    # 90e9 tokens / (1024 x 4096 tokens per step) = 21,458 steps
    steps=21458,
    warmup_steps=2000,
    lr=4e-5,
    end_lr=4e-6,  # not in the paper: 10% of peak, as Llama-2
    weight_decay=0.0,  # not in the paper: plain Adam
    batch_size=1024,
    seq_len=4096,
    # 4 microbatches of 256 rows fit a v4 chip's 32 GiB with the splash kernel; 2 fit only with the
    # model's remat="offload" (the figures: BENCHMARKS.md, from python -m tools.aot)
    microbatches=4,
    mesh=(1, 32, 8),  # fsdp 32 x tensor 8 = 256 chips
    sources=(
        Source("code", tuple(f"{BUCKET}/the-stack-dedup/data/{lang}/*.parquet" for lang in STACK_LANGUAGES),
               weight=10.0, field="content"),
        # text, 1 part in 11: RefinedWeb (parquet, column "content") and RedPajama-1T's text subsets
        # (jsonl, field "text"; its github subset is code, left out). The split between the two
        # is not in the paper: half each.
        Source("refinedweb", (f"{BUCKET}/falcon-refinedweb/data/*.parquet",), weight=0.5, field="content"),
        Source("redpajama", tuple(f"{BUCKET}/redpajama-1t/{subset}/*.jsonl" for subset in
                                  ("arxiv", "book", "c4", "common_crawl", "stackexchange", "wikipedia")),
               weight=0.5, field="text"),
    ),
    log_every=10,
    eval_every=500,
    eval_batches=1,
    checkpoint_every=500,  # est. 7-62 s a save, <= 0.25% of training time (docs/pods.md, "Checkpoint cost")
    keep_checkpoints=3,
)
