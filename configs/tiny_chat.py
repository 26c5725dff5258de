# The chat demo: fine-tune the tiny pretrained model (python train.py configs/tiny.py -> out/tiny)
# on the built-in instruction set (questions about the standard library, answered from its
# docstrings and signatures; every chat format), 2 epochs, a few minutes on 2 CPU cores:
#   python sft.py configs/tiny_chat.py
#   python sample.py out/tiny_chat --chat --prompt 'What does `shlex.quote` do?'
from config import SFTConfig

config = SFTConfig(
    out_dir="out/tiny_chat",
    model="tiny",
    init_from="ckpt:out/tiny",
    epochs=2,  # steps derived: ceil(packed rows of both epochs / batch_size)
    warmup_ratio=0.05,
    lr=1e-3,  # the tiny model's scale (pretrained at 2e-3); the 70B recipe uses 2e-5
    end_lr=0.0,
    batch_size=8,
    seq_len=256,
    mesh=(1, 1, 1),
    log_every=5,
    eval_every=25,
    eval_batches=1,
    checkpoint_every=25,
    keep_checkpoints=1,
)
