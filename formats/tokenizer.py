"""The tokenizer: a sentencepiece model plus added special tokens (Lemur-Chat's ChatML tokens) with
ids right after its vocabulary, and the two files that carry it: `tokenizer.model` and the added
tokens. A Hugging Face directory lists them in `added_tokens.json` ({token: id}); a checkpoint of
ours copies the model file in and records the added tokens in its meta.json (checkpoint.py).
"""
import itertools
import json
import re

import sentencepiece as spm

from formats import storage


class Tokenizer:
    """A sentencepiece model plus added special tokens with ids after the base vocabulary."""

    def __init__(self, model_path: str, added_tokens: tuple[str, ...] = (), model_proto: bytes | None = None):
        """model_proto: the file's bytes when the caller has read them already (and checked them)."""
        if model_proto is None and not storage.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model {model_path!r} does not exist")
        self.model_path = model_path
        self.model_proto = storage.read_bytes(model_path) if model_proto is None else model_proto
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except RuntimeError:  # sentencepiece's own words (ParseFromArray) name neither the file nor the fix
            raise ValueError(f"{model_path}: not a sentencepiece model (sentencepiece cannot parse it); "
                             "a tokenizer must be a .model file written by sentencepiece") from None
        base = self.sp.get_piece_size()
        self.added = {tok: base + i for i, tok in enumerate(added_tokens)}
        self.added_text = {i: tok for tok, i in self.added.items()}
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = base + len(self.added)
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path}: packing needs bos and eos tokens")
        # longest first, so that a token containing another one wins
        alternatives = "|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))
        self._split = re.compile(f"({alternatives})") if self.added else None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids (no bos/eos); added tokens are cut out first, the rest goes to sentencepiece."""
        if not self._split:
            return self.sp.encode(texts, num_threads=num_threads)
        pieces = [self._split.split(t) for t in texts]  # text, token, text, token, ..., text
        plain = iter(self.sp.encode([p for ps in pieces for p in ps[::2]], num_threads=num_threads))
        return [[i for j, p in enumerate(ps) for i in ([self.added[p]] if j % 2 else next(plain))]
                for ps in pieces]

    def decode(self, ids) -> str:
        runs = itertools.groupby(map(int, ids), key=lambda i: i in self.added_text)
        return "".join("".join(map(self.added_text.get, run)) if added else self.sp.decode(list(run))
                       for added, run in runs)


    def save(self, path: str, chat_template: str | None = None):
        """Write tokenizer.model (a copy of the file), added_tokens.json (if there are added tokens)
        and tokenizer_config.json into directory `path`, as Hugging Face directories hold them, so
        that transformers' AutoTokenizer (and vLLM, TGI) encode as we do: a Llama tokenizer in
        legacy mode (a text after a special token starts a new sentencepiece text, with its dummy
        prefix, as our encode does), bos added, the added tokens special, and `chat_template` (a
        Jinja template; chat.CHAT_TEMPLATE for chat runs) for apply_chat_template."""
        storage.write_bytes(storage.join(path, "tokenizer.model"), self.model_proto)
        if self.added:
            storage.write_bytes(storage.join(path, "added_tokens.json"), json.dumps(self.added, indent=2).encode())
        piece = self.sp.id_to_piece
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
                  "bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id), "unk_token": piece(self.sp.unk_id()),
                  "clean_up_tokenization_spaces": False,
                  "added_tokens_decoder": {str(i): {"content": tok, "special": True, "normalized": False, "lstrip": False,
                                                    "rstrip": False, "single_word": False} for tok, i in self.added.items()}}
        if "<pad>" in self.added:
            config["pad_token"] = "<pad>"
        if chat_template is not None:
            config["chat_template"] = chat_template
        storage.write_bytes(storage.join(path, "tokenizer_config.json"), json.dumps(config, indent=2).encode())

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """The tokenizer of a Hugging Face directory: tokenizer.model and, if present,
        added_tokens.json, whose ids must follow the sentencepiece vocabulary without gaps."""
        added = {}
        if storage.isfile(storage.join(path, "added_tokens.json")):
            added = json.loads(storage.read_bytes(storage.join(path, "added_tokens.json")))
        tokenizer = cls(storage.join(path, "tokenizer.model"), added_tokens=tuple(sorted(added, key=added.get)))
        if any(tokenizer.added[t] != i for t, i in added.items()):
            raise ValueError(f"{path}/added_tokens.json: ids must follow the sentencepiece vocabulary without gaps")
        return tokenizer
