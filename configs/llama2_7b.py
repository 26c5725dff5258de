# Ablations at 7B: the Lemur recipe on Llama-2-7B, on a TPU v4-32 (16 chips). On every host:
#   python train.py configs/llama2_7b.py
# Compile-only check from any machine with jax[tpu]:  python -m tools.aot configs/llama2_7b.py --topology=v4-32
from config import Source, TrainConfig

config = TrainConfig(
    out_dir="/mnt/lemur/llama2_7b",
    model="llama2_7b",
    init_from="hf:/mnt/lemur/Llama-2-7b-hf",
    tokenizer="/mnt/lemur/Llama-2-7b-hf/tokenizer.model",
    steps=21458,
    warmup_steps=2000,
    lr=4e-5,
    end_lr=4e-6,
    batch_size=1024,
    seq_len=4096,
    microbatches=16,
    mesh=(1, 16, 1),
    sources=(
        Source("code", ("/mnt/lemur/the-stack/*/*.jsonl.zst",), weight=10.0, field="content"),
        Source("text", ("/mnt/lemur/refinedweb/*.jsonl.zst", "/mnt/lemur/redpajama/*/*.jsonl.zst"), weight=1.0),
    ),
    eval_batches=1,
)
