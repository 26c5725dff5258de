# Lemur-70B-Chat: instruction fine-tuning of the Lemur-70B checkpoint (configs/lemur70b.py) on
# ~300K conversations (OpenAssistant, Orca, ShareGPT, Evol-CodeAlpaca) in ChatML, on a TPU v4-512.
# On every host:   python sft.py configs/lemur70b_chat.py
# Paths are placeholders for your storage; out_dir must be visible to every host.
from config import Source, SFTConfig

config = SFTConfig(
    out_dir="/mnt/lemur/lemur70b_chat",
    model="llama2_70b",
    init_from="ckpt:/mnt/lemur/lemur70b",  # its newest checkpoint; "hf:DIR" for published weights
    tokenizer="/mnt/lemur/Llama-2-70b-hf/tokenizer.model",  # + Lemur-Chat's 5 tokens, vocab 32064
    # the paper: Adam, lr 2e-5, batch 128, 2 epochs; steps = ceil(packed rows / 128), derived
    epochs=2,
    lr=2e-5,
    # the paper's gap: 3% linear warmup, cosine to 0 (the Alpaca/Vicuna recipe), plain Adam
    warmup_ratio=0.03,
    end_lr=0.0,
    weight_decay=0.0,
    b1=0.9,
    b2=0.999,
    grad_clip=1.0,
    batch_size=128,  # packed rows of 4096 tokens
    seq_len=4096,
    microbatches=4,
    mesh=(1, 32, 8),
    document_mask=True,  # a packed row trains like its conversations one by one
    sources=(  # weight = times each example is seen per epoch
        Source("oasst", ("/mnt/lemur/sft/openassistant/*.jsonl",), weight=1.0, eval_fraction=0.002),
        Source("orca", ("/mnt/lemur/sft/orca/*.jsonl",), weight=1.0, eval_fraction=0.002),
        Source("sharegpt", ("/mnt/lemur/sft/sharegpt/*.json",), weight=1.0, eval_fraction=0.002),
        Source("evol_codealpaca", ("/mnt/lemur/sft/evol_codealpaca/*.json",), weight=1.0, eval_fraction=0.002),
    ),
    log_every=1,
    eval_every=50,
    eval_batches=1,
    checkpoint_every=100,
    keep_checkpoints=2,
)
