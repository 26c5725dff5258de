"""Lemur continued pretraining: the paper's optimizer, schedule and 4M-token batch.

    python train.py configs/tiny.py                  # the demo: a few minutes on a CPU
    python train.py configs/lemur70b.py              # the paper's run: same command on every host
    python train.py configs/tiny.py --lr=1e-3 --mesh=1,4,2   # type-checked overrides
    python train.py configs/lemur70b.py --aot=v4-512 # compile for a TPU topology on this machine

The recipe lives in the config file (configs/lemur70b.py: Llama-2-70B, 90B tokens of code:text =
10:1, 1024 x 4096 tokens per step, Adam b1 0.9 b2 0.95, clip 1.0, peak lr 4e-5 after 2000 warmup
steps, cosine decay) and runs through trainer.py: the optimizer, the accumulated step and the loop
(resume, evaluation, checkpoints, preemption), which sft.py and aot.py share. `--aot=SLICE` hands
the config to aot.py instead of training.
"""
import sys

import config
import sharding
import trainer


def main(argv):
    if len(argv) < 1 or argv[0].startswith("--"):
        raise SystemExit("usage: python train.py CONFIG [--key=value ...] [--aot=TOPOLOGY]")
    aot = [a for a in argv[1:] if a.startswith("--aot=")]
    if not aot:
        sharding.select_platforms()
    cfg = config.load(argv[0], [a for a in argv[1:] if not a.startswith("--aot=")])
    if aot:
        import aot as aot_module  # here, not at the top: it points JAX at the CPU (the TPU is only described)
        return aot_module.compile_train_step(cfg, aot[0].split("=", 1)[1])
    sharding.initialize_distributed()
    trainer.train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
