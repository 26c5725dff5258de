# The README's main job: a ~13M-param Llama on the built-in demo corpus (Python's standard
# library as code, its documentation as text, 10:1 by tokens), the Lemur schedule scaled down.
# A few minutes on 2 CPU cores:
#   python train.py configs/tiny.py
from config import TrainConfig

config = TrainConfig(
    out_dir="out/tiny",
    model="tiny",
    steps=200,
    warmup_steps=20,
    lr=2e-3,
    end_lr=2e-4,
    batch_size=16,
    seq_len=128,
    microbatches=1,
    mesh=(1, 1, 1),
    log_every=10,
    eval_every=100,
    eval_batches=2,
    checkpoint_every=100,
    keep_checkpoints=2,
    sample_prompt="def fibonacci(n):",
)
