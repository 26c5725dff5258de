"""Export a training checkpoint as a Hugging Face Llama directory, streamed one layer of one tensor
at a time (a 70B export never holds more in memory).

    python convert.py OUT_DIR_OR_CHECKPOINT HF_DIR [--dtype=bfloat16|float16|float32]

The source is a checkpoint (out_dir/step_XXXXXXXX) or a run's out_dir (its newest checkpoint),
saved on any mesh. HF_DIR gets config.json, safetensors files of at most 5 GiB (with an index
when there are several) and the run's tokenizer: tokenizer.model, plus added_tokens.json for chat
runs. The conversion itself (both directions, and the Python API `load_hf` / `save_hf`) is hf.py.
"""
import sys

import numpy as np

import checkpoint
import data
import hf
import model
from hf import load_hf, save_hf  # noqa: F401  (the Python API, once documented as convert.load_hf)


class _SavedParam:
    """A param of a training checkpoint, read one layer at a time (save_hf indexes stacked
    params by layer), so exporting 70B holds one layer of one tensor in memory."""

    def __init__(self, reader, key: str):
        self.reader, self.key, self.shape = reader, key, reader.shape(key)

    def __getitem__(self, layer: int):
        return self.reader.read(self.key, (slice(layer, layer + 1),))[0]

    def __array__(self, dtype=None, copy=None):
        return self.reader.read(self.key).astype(dtype or np.float32)


def main(argv):
    """python convert.py CKPT_DIR HF_DIR [--dtype=bfloat16|float16|float32]
    CKPT_DIR is a checkpoint (out_dir/step_XXXXXXXX) or a run's out_dir (its newest checkpoint)."""
    args = [a for a in argv if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    if len(args) != 2 or set(options) - {"dtype"}:
        raise SystemExit(main.__doc__)
    src, dst = args
    reader = checkpoint.Reader(checkpoint.latest(src))
    cfg = reader.model_config()
    params = hf.unflatten((key, _SavedParam(reader, "params/" + key)) for key, _ in hf.flatten(model.param_shapes(cfg)))
    hf.save_hf(params, cfg, dst, options.get("dtype", "bfloat16"))
    data.checkpoint_tokenizer(reader).save(dst)  # the run's tokenizer goes along: the directory is complete
    print(f"wrote {dst} from {reader.path} ({model.param_count(cfg):,} params)")


if __name__ == "__main__":
    main(sys.argv[1:])
