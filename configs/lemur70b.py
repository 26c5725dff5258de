# Lemur-70B: continued pretraining of Llama-2-70B on 90B tokens, code:text = 10:1 by tokens, on a
# TPU v4-512 (256 chips). Run the same command on every host of the pod:
#   python train.py configs/lemur70b.py
# Check that it fits first, on any machine with jax[tpu] installed (compile only):
#   python train.py configs/lemur70b.py --aot=v4-512
# Paths are placeholders for your storage; out_dir must be visible to every host.
from config import TrainConfig
from data import Source

config = TrainConfig(
    out_dir="/mnt/lemur/lemur70b",
    model="llama2_70b",
    init_from="hf:/mnt/lemur/Llama-2-70b-hf",
    tokenizer="/mnt/lemur/Llama-2-70b-hf/tokenizer.model",
    # 90e9 tokens / (1024 x 4096 tokens per step) = 21,458 steps
    steps=21458,
    warmup_steps=2000,
    lr=4e-5,
    end_lr=4e-6,  # not in the paper: 10% of peak, as Llama-2
    weight_decay=0.0,  # not in the paper: plain Adam
    batch_size=1024,
    seq_len=4096,
    # 4 microbatches of 256 rows: 20.2 GiB of 32 per chip with the splash attention kernel (python
    # aot.py configs/lemur70b.py --topology=v4-512). 2 take 32.1 GiB and fit only with the model's
    # remat="offload" (layer inputs in host memory: 15.9 GiB; BENCHMARKS.md)
    microbatches=4,
    mesh=(1, 32, 8),  # fsdp 32 x tensor 8 = 256 chips
    sources=(
        # The Stack, scripting languages (Python the largest share); field "content"
        Source("code", ("/mnt/lemur/the-stack/*/*.jsonl.zst",), weight=10.0, field="content"),
        # RefinedWeb, RedPajama (Wikipedia, Books, ArXiv, StackExchange, ...), DM Mathematics
        Source("text", ("/mnt/lemur/refinedweb/*.jsonl.zst", "/mnt/lemur/redpajama/*/*.jsonl.zst"), weight=1.0),
    ),
    log_every=10,
    eval_every=500,
    eval_batches=1,
    checkpoint_every=500,
    keep_checkpoints=3,
)
