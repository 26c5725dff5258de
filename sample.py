"""Talk to a checkpoint or a Hugging Face model: the prompts decoded as one batch with a KV cache
(decode.py), on one device or sharded over a mesh of all devices.

    python sample.py out/tiny --prompt "def fibonacci(n):"                 # a training out_dir: newest checkpoint
    python sample.py out/tiny_chat --chat --prompt 'What does `shlex.quote` do?'
    python sample.py out/tiny_chat                                          # interactive chat
    python sample.py Llama-2-7b-hf --prompt "..." --temperature 0.8 --top_p 0.95 --seed 1
    python sample.py Lemur-70B-Chat --mesh=1,1,8 --chat --prompt "..." --prompt "..."   # a TPU v4-16, every host

Sources: a training out_dir (its newest complete checkpoint) or one checkpoint directory, saved on
any mesh, with the model config and tokenizer the checkpoint carries; or a Hugging Face Llama
directory (tokenizer.model and, if present, added_tokens.json in it); any of them in a bucket.
The params are read in decode.py's layout (tensor-parallel, in the compute dtype) onto one device,
or with --mesh=DATA,FSDP,TENSOR (product = all devices of all processes; start the same command on
every host) onto that mesh, each process reading only its own slices. The prompts (--prompt,
repeatable) are decoded as one batch. `--chat` wraps
each prompt in ChatML (chat.encode_prompt) and stops at `<|im_end|>`; without `--prompt` it chats
(one process only). Decoding: greedy (temperature 0, the default) or temperature / top-k / top-p
from a seed.
"""
import argparse

import jax

import chat
import config
import decode
import sharding
from formats import weights


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate text from a checkpoint or a Hugging Face directory.")
    parser.add_argument("path", help="training out_dir, checkpoint directory or Hugging Face Llama directory")
    parser.add_argument("--prompt", action="append",
                        help="generate from this prompt (repeat it for a batch; default: interactive chat)")
    parser.add_argument("--mesh", help="DATA,FSDP,TENSOR: generate on a mesh of all devices (default: one device)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in ChatML, stop at <|im_end|>")
    parser.add_argument("--system", default="", help="a system message for chat")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sharding.select_platforms()
    try:  # before anything is loaded
        decode.check_options(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(str(e))
    try:
        mesh = config.command_mesh(args.mesh)
    except ValueError as e:
        parser.error(str(e))
    if args.prompt is None and jax.process_count() > 1:
        parser.error("several processes cannot share an interactive chat: pass --prompt")
    params, cfg, tokenizer = weights.for_serving(args.path, mesh)
    chatting = args.chat or args.prompt is None
    if chatting and "<|im_end|>" not in tokenizer.added:
        raise SystemExit(f"{args.path}: not a chat model (its tokenizer has no <|im_end|>); pass --prompt without --chat")
    stop = (tokenizer.added["<|im_end|>"], tokenizer.eos_id) if chatting else (tokenizer.eos_id,)
    opts = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=stop,
                vocab_size=tokenizer.vocab_size)
    history = [("system", args.system)] if args.system else []

    def run(batch: list) -> list:
        return decode.generate(params, cfg, mesh, batch, args.max_new_tokens, seed=args.seed, **opts)

    def text(out: list) -> str:
        return tokenizer.decode(out[:-1] if out and out[-1] in stop else out)

    def encode(prompt: str, turns: list) -> list:
        return chat.encode_prompt(turns + [("user", prompt)], tokenizer) if chatting else \
            [tokenizer.bos_id] + tokenizer.encode(prompt)

    def reply(prompt: str) -> str:
        answer = text(run([encode(prompt, history)])[0])
        history.extend([("user", prompt), ("assistant", answer)])
        return answer

    if args.prompt is not None:
        outs = run([encode(p, history) for p in args.prompt])
        if jax.process_index() == 0:
            for prompt, out in zip(args.prompt, outs):
                print(text(out) if chatting else prompt + text(out))
        return
    print("chat: an empty line or Ctrl-D ends it")
    while (prompt := input_or_none("user> ")):
        print(f"assistant> {reply(prompt)}")


def input_or_none(prefix: str):
    try:
        return input(prefix)
    except EOFError:
        return None


if __name__ == "__main__":
    config.command(main)
