# The README's main job: a 6.3M-param Llama on the built-in demo corpus (Python's standard
# library as code, its documentation as text, 10:1 by tokens), the Lemur schedule scaled down.
# About 4 minutes on 2 CPU cores; the loss falls from 7.0 to about 3.5:
#   python train.py configs/tiny.py
from config import TrainConfig

config = TrainConfig(
    out_dir="out/tiny",
    model="tiny",
    steps=500,
    warmup_steps=50,
    lr=2e-3,
    end_lr=2e-4,
    batch_size=8,
    seq_len=256,
    microbatches=1,
    mesh=(1, 1, 1),
    log_every=10,
    eval_every=50,
    eval_batches=2,
    checkpoint_every=250,
    keep_checkpoints=2,
    sample_prompt="def fibonacci(n):",
)
