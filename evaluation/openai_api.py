"""The OpenAI API as the server speaks it, without the web framework: requests checked into
options, prompts rendered with the model's chat format, text cut at stop strings, and the JSON
of responses, stream chunks and errors. evaluation/server.py serves it (`python -m evaluation.server`).

Fields follow OpenAI's (and vLLM's, which agent harnesses are written against): `temperature`
(default 1, as OpenAI), `top_p`, `top_k` (vLLM's extra; -1 or 0 = all), `max_tokens` (chat: also
`max_completion_tokens`; default: the rest of the context for chat, 16 for completions, as
OpenAI), `stop` (a string or up to 16), `seed`, `stream` with `stream_options.include_usage`.
Unknown fields are ignored; a known field of the wrong type or value is a 400 naming it, and so
are what this server does not do (`n` > 1, `logprobs`). Errors are OpenAI's shape, `{"error":
{"message", "type", "param", "code"}}`; a prompt that does not fit gets vLLM's wording ("This
model's maximum context length is N tokens ..."), which harnesses match on.

Chat formats: a Hugging Face directory's `chat_template` (tokenizer_config.json) rendered with
Jinja as transformers' apply_chat_template does; else ChatML exactly as Lemur-Chat was trained
(chat.encode_prompt) when the tokenizer has `<|im_start|>`/`<|im_end|>` (our chat checkpoints and
their exports); else no chat endpoint (400). A reply's text is its tokens decoded without special
tokens (as transformers' `skip_special_tokens`); a completion's keeps the space its first token
opens with (decoded after the prompt's last tokens).
"""
import json
import re
import time

import chat
import decode
from formats import storage

MAX_STOP = 16  # stop strings per request (MINT sends 5)


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status, a message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _field(body: dict, name: str, types, default, what: str):
    value, types = body.get(name), types if isinstance(types, tuple) else (types,)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)}", name)
    return value


def options(body: dict, chat_request: bool) -> dict:
    """The generation options of a request body, each checked: max_tokens (None: the rest of the
    context), temperature, top_k, top_p, seed (None: random), stop strings, stream, include_usage."""
    name = "max_completion_tokens" if chat_request and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, name, int, None if chat_request else 16, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'{name}' must be at least 1, got {max_tokens}", name)
    temperature = _field(body, "temperature", (int, float), 1.0, "a number")
    top_p = _field(body, "top_p", (int, float), 1.0, "a number")
    top_k = _field(body, "top_k", int, 0, "an integer")
    top_k = 0 if top_k == -1 else top_k  # vLLM's "all tokens"
    for field, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        try:
            decode.check_options(**{"temperature": 0.0, "top_k": 0, "top_p": 1.0, field: value})
        except ValueError as e:
            raise ApiError(400, f"'{field}': {e}", field) from None
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream_options = _field(body, "stream_options", dict, {}, "an object")
    if _field(body, "n", int, 1, "an integer") != 1:
        raise ApiError(400, "'n': only 1 choice per request is supported", "n")
    for field in ("logprobs", "top_logprobs", "echo"):
        if body.get(field):
            raise ApiError(400, f"'{field}' is not supported by this server", field)
    return {"max_tokens": max_tokens, "temperature": float(temperature), "top_k": top_k, "top_p": float(top_p),
            "seed": _field(body, "seed", int, None, "an integer"), "stop": stop,
            "stream": _field(body, "stream", bool, False, "a boolean"),
            "include_usage": bool(stream_options.get("include_usage"))}


def context_error(context: int, prompt: int, max_tokens: int | None, what: str) -> ApiError:
    """vLLM's wording of a request that does not fit the context."""
    if max_tokens is None:
        return ApiError(400, f"This model's maximum context length is {context} tokens. However, your {what} resulted "
                             f"in {prompt} tokens. Please reduce the length of the {what}.", "messages")
    return ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                         f"{prompt + max_tokens} tokens ({prompt} in the {what}, {max_tokens} in the completion). "
                         f"Please reduce the length of the {what} or completion.", "max_tokens")


class Prompts:
    """A model's tokenizer and chat format: request bodies -> prompt ids, ids -> text."""

    def __init__(self, tokenizer, path: str | None = None):
        self.tokenizer, self.template = tokenizer, None
        config = storage.join(path, "tokenizer_config.json") if path else None
        if config and storage.isfile(config):
            self.template = json.loads(storage.read_bytes(config)).get("chat_template")
        piece = tokenizer.sp.id_to_piece
        self.specials = {piece(tokenizer.bos_id): tokenizer.bos_id, piece(tokenizer.eos_id): tokenizer.eos_id}
        self._specials = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")
        self.skip = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.sp.unk_id(), *tokenizer.added.values()}

    @property
    def can_chat(self) -> bool:
        return self.template is not None or chat.is_chat(self.tokenizer)

    def stop_tokens(self, chat_request: bool) -> tuple:
        end = self.tokenizer.added.get("<|im_end|>")
        return (self.tokenizer.eos_id,) + ((end,) if chat_request and end is not None else ())

    def chat(self, body: dict) -> list[int]:
        """Prompt ids of a chat request's messages, with the generation prompt."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        turns = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: the text ones, joined
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must have a role of system, user or assistant and text content",
                               "messages")
            turns.append((m["role"], content))
        if not self.can_chat:
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        if self.template is None:
            return chat.encode_prompt(turns, self.tokenizer)
        return self.encode(render_template(self.template, [{"role": r, "content": c} for r, c in turns],
                                           bos_token=self._piece(self.tokenizer.bos_id),
                                           eos_token=self._piece(self.tokenizer.eos_id)))

    def _piece(self, token: int) -> str:
        return self.tokenizer.sp.id_to_piece(token)

    def encode(self, text: str) -> list[int]:
        """Ids of a rendered text: bos/eos written out are those tokens (as transformers' special
        tokens), added tokens too, the rest sentencepiece."""
        parts = self._specials.split(text)
        return [i for j, part in enumerate(parts) for i in ([self.specials[part]] if j % 2 else
                                                            self.tokenizer.encode(part) if part else [])]

    def completion(self, body: dict) -> list[int]:
        """Prompt ids of a completion request: a string (after a bos, as transformers encodes) or ids."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) and
                                                       0 <= i < self.tokenizer.vocab_size for i in prompt):
            return prompt
        raise ApiError(400, "'prompt' must be a non-empty string (one per request) or a list of token ids", "prompt")

    def text(self, ids: list[int], after: list[int] = ()) -> str:
        """ids as text without special tokens; after: tokens before them (their text is cut off),
        so the text keeps the space its first token opens with."""
        ids = [i for i in ids if i not in self.skip]
        head = [i for i in after if i not in self.skip]
        return self.tokenizer.decode(head + ids)[len(self.tokenizer.decode(head)):] if head else self.tokenizer.decode(ids)


def render_template(template: str, messages: list, **variables) -> str:
    """A Hugging Face chat template rendered as apply_chat_template(add_generation_prompt=True) does."""
    from formats.readers import optional
    sandbox = optional("jinja2.sandbox", "render a Hugging Face chat template (pip install jinja2)")

    def raise_exception(message):
        raise ApiError(400, f"the chat template refused the messages: {message}", "messages")

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **variables)


class Text:
    """The text of one reply as its tokens arrive: cut at the first stop string, and what can be
    sent so far (held back: a possible start of a stop string, an unfinished UTF-8 character)."""

    def __init__(self, prompts: Prompts, stop: list[str], after: list[int] = ()):
        self.prompts, self.stop, self.after, self.ids, self.sent = prompts, stop, list(after), [], ""
        self.hold = max(map(len, stop), default=1) - 1

    def add(self, token: int) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the reply)."""
        self.ids.append(token)
        text = self.prompts.text(self.ids, self.after)
        cut = min((i for i in (text.find(s, max(0, len(self.sent) - self.hold)) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            return self._send(text[:cut]), True
        ready = text.rstrip("\ufffd")
        return self._send(ready[:len(ready) - self.hold] if self.hold else ready), False

    def finish(self) -> str:
        return self._send(self.prompts.text(self.ids, self.after))

    def _send(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


def response(kind: str, rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    """A whole reply: chat.completion or text_completion."""
    choice = ({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}], "usage": usage}


def chunk(kind: str, rid: str, model: str, text: str = "", finish: str | None = None, role: bool = False) -> dict:
    """One event of a stream: the role (chat's first), a piece of text, or the last with finish."""
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, counts: dict) -> dict:
    """The stream's last event with stream_options.include_usage: no choices, the usage."""
    return {**chunk(kind, rid, model), "choices": [], "usage": counts}


def event(body: dict | str) -> str:
    """A server-sent event: `data: JSON` (or `data: [DONE]`) and a blank line."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
