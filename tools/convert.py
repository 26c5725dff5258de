"""Export a training checkpoint as a Hugging Face Llama directory, streamed one layer of one tensor
at a time (a 70B export never holds more in memory).

    python -m tools.convert OUT_DIR_OR_CHECKPOINT HF_DIR [--dtype=bfloat16|float16|float32] [--force]

The source is a checkpoint (out_dir/step_XXXXXXXX) or a run's out_dir (its newest checkpoint),
saved on any mesh. HF_DIR gets config.json, safetensors files of at most 5 GiB (with an index when
there are several) and the run's tokenizer: tokenizer.model, plus added_tokens.json for chat runs.
A non-empty HF_DIR is refused unless `--force`, which replaces only the files an export writes
(weight shards, their index, config.json, tokenizer.model, added_tokens.json) and no others. The
conversion itself (both directions, and the Python API `load_hf` / `save_hf`) is hf.py.
"""
import argparse

import numpy as np

import chat
import model
from formats import checkpoint, hf, storage


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
    parser = argparse.ArgumentParser(description="Export a training checkpoint as a Hugging Face Llama directory.")
    parser.add_argument("src", help="a checkpoint (out_dir/step_XXXXXXXX) or a run's out_dir (its newest checkpoint)")
    parser.add_argument("dst", help="the Hugging Face directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=hf.DTYPES, help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty dst, replacing the files of an earlier export (only those)")
    args = parser.parse_args(argv)
    present = sorted(storage.listdir(args.dst))
    if present and not args.force:
        parser.error(f"{args.dst} is not empty ({', '.join(present[:5])}{' ...' if len(present) > 5 else ''}); "
                     "pass --force to replace an earlier export's files there")
    reader = checkpoint.Reader(checkpoint.latest(args.src))
    cfg = reader.model_config()
    for name in hf.export_files(args.dst):  # an earlier export's, and nothing else
        storage.remove(storage.join(args.dst, name))
    params = hf.unflatten((key, _SavedParam(reader, "params/" + key)) for key, _ in hf.flatten(model.param_shapes(cfg)))
    hf.save_hf(params, cfg, args.dst, args.dtype)
    tokenizer = reader.tokenizer()  # the run's tokenizer goes along: the directory is complete
    tokenizer.save(args.dst, chat.CHAT_TEMPLATE if chat.is_chat(tokenizer) else None)
    print(f"wrote {args.dst} from {reader.path} ({model.param_count(cfg):,} params)")


if __name__ == "__main__":
    import config
    config.command(main)
