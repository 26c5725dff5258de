"""An OpenAI-compatible server with continuous batching on a mesh: agent harnesses (MINT,
InterCode, AgentBench, WebArena), lm-eval's `local-chat-completions` and agent frameworks talk to
a model of this project as they talk to vLLM.

    pip install fastapi uvicorn                                     # the web framework (optional)
    python -m evaluation.server out/tiny_chat                       # http://127.0.0.1:8000/v1
    python -m evaluation.server gs://BUCKET/Lemur-70B-Chat --mesh=1,1,8 --slots=8 --context=4096 \
        --host=0.0.0.0 --api_key=KEY                                # on every host of a v4-16

MODEL is anything the evaluation reads (a training out_dir, a checkpoint, a Hugging Face
directory; local or in a bucket). Endpoints: POST /v1/chat/completions, POST /v1/completions,
GET /v1/models, GET /health, GET /metrics (Prometheus text: decode and prefill steps, tokens,
reused prompt tokens, running and waiting requests). What a request may hold, the chat formats
and the errors: openai_api.py. With --api_key, /v1/ needs `Authorization: Bearer KEY` (else 401).

Continuous batching (decode.Engine): --slots rows decode together. A request takes a free slot as
soon as one frees (the one whose cache holds most of its prompt, as a conversation's previous turn
left it); the rest of its prompt is prefilled into that slot's row of the KV cache, one chunk per
turn between decode steps, while the other rows decode on. It leaves at a stop token or string,
its max_tokens, the context (--context positions per slot), or when its client goes away.
Requests beyond the slots wait in a queue of --queue (full: 429). One thread runs the engine; the
event loop only parses, queues and streams. Trade-offs: a prefill chunk runs one row (the chips of
the other rows' shards compute along), which keeps the decode step one compiled shape for all
slots; a reply's text is decoded whole at each token to find stop strings (cheap beside a step).

Multi-host: start the same command on every host (--mesh spans all devices). Process 0 serves
HTTP and decides at each turn what joins and leaves; the decision is broadcast and every process
applies it and runs the same steps. SIGTERM or Ctrl-C: stop accepting, end the running rows
(finish_reason "length"), answer the waiting ones 503, exit 0.
"""
import argparse
import asyncio
import collections
import contextlib
import json
import logging
import queue
import secrets
import signal
import threading
import traceback
import uuid

import jax
import numpy as np

import config
import decode
import sharding
from evaluation.openai_api import (ApiError, Prompts, Text, chunk, context_error, event, options, parse_json,
                                   response, usage, usage_chunk)
from formats import readers, weights

log = logging.getLogger("evaluation.server")


class Request:
    """One request on its way: its prompt and options, its reply's text, the queue its events
    go to ((text, finish_reason, ApiError or None), put from the engine's thread): an asyncio
    queue of the event loop `loop`, or without one (the agent's threads) a plain queue."""

    def __init__(self, kind: str, prompt: list, opts: dict, stop_tokens: tuple, prompts: Prompts, loop=None):
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.kind, self.prompt, self.opts, self.stop_tokens, self.loop = kind, prompt, opts, stop_tokens, loop
        self.text = Text(prompts, opts["stop"], after=[] if kind == "chat" else prompt[-8:])
        self.seed = decode.row_seed(opts["seed"]) if opts["seed"] is not None else secrets.randbits(32)
        self.events = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self.slot, self.done, self.steps = None, False, []

    def put(self, text: str, finish: str | None = None, error: ApiError | None = None):
        if self.loop is None:
            self.events.put((text, finish, error))
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (text, finish, error))


def broadcast(plan):
    """Process 0's plan (a JSON-able dict) on every process (None elsewhere)."""
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(plan).encode(), np.uint8) if plan is not None else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = np.zeros(max(256, 1 << (n - 1).bit_length()), np.uint8)  # few sizes: few compiles
    buffer[:len(data)] = data
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:n]))


class Scheduler:
    """The engine's loop. Each turn: a plan (the slots that leave; the waiting requests that join
    free slots; whether to stop), made by process 0 and broadcast, applied by every process, then
    one engine.advance; process 0 turns the new tokens into text for the requests."""

    def __init__(self, engine: decode.Engine, queue: int):
        self.engine, self.queue = engine, queue
        self.waiting, self.running, self.leaving = collections.deque(), {}, set()
        self.lock, self.stopping = threading.Condition(), False
        self.history = []  # finished requests: id, tokens, finish_reason, decode steps of their first and last token
        self.multi = jax.process_count() > 1

    def submit(self, req: Request):
        with self.lock:
            if self.stopping:
                raise ApiError(503, "the server is shutting down")
            if len(self.waiting) >= self.queue:
                raise ApiError(429, f"{self.queue} requests are waiting for a slot already: try again later")
            self.waiting.append(req)
            self.lock.notify()

    def cancel(self, req: Request):
        """The client went away: free its place (no-op for a finished request)."""
        with self.lock:
            if req.done:
                return
            req.done = True
            if req in self.waiting:
                self.waiting.remove(req)
            elif self.running.get(req.slot) is req:
                del self.running[req.slot]
                self.leaving.add(req.slot)
            self.lock.notify()

    def shutdown(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()

    def _plan(self) -> dict:
        with self.lock:
            if not (self.waiting or self.leaving or self.stopping or self.engine.busy()):
                self.lock.wait(timeout=1.0)  # idle; at least one (empty) plan a second keeps other hosts listening
            if self.stopping:
                for req in self.waiting:
                    req.done = True
                    req.put("", error=ApiError(503, "the server is shutting down"))
                self.waiting.clear()
                for slot, req in list(self.running.items()):
                    self.leaving.add(slot)
                    self._end(req, req.text.finish(), "length")
            free = sorted(set(self.engine.free_slots()) | self.leaving)
            joins = []
            while free and self.waiting:
                req = self.waiting.popleft()
                # the free slot whose cache holds most of this prompt (a conversation's last turn): less to prefill
                req.slot = max(free, key=lambda slot: self.engine.reusable(slot, req.prompt))
                free.remove(req.slot)
                self.running[req.slot] = req
                o = req.opts
                joins.append([req.slot, req.prompt, o["max_tokens"], o["temperature"], o["top_k"], o["top_p"], req.seed,
                              req.stop_tokens])
            plan = {"leave": sorted(self.leaving), "join": joins, "stop": self.stopping}
            self.leaving.clear()
            return plan

    def apply(self, plan: dict) -> bool:
        """Every process: the plan's leaves and joins, then one turn of the engine (False: stop)."""
        for slot in plan["leave"]:
            self.engine.leave(slot)
        for slot, prompt, max_new, temperature, top_k, top_p, seed, stop in plan["join"]:
            self.engine.join(slot, prompt, max_new, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             stop_tokens=stop)
        if plan["stop"]:
            return False
        if self.engine.busy():
            events = self.engine.advance()
            if jax.process_index() == 0:
                self._deliver(events)
        return True

    def _deliver(self, events: list):
        with self.lock:
            for slot, token, finish in events:
                req = self.running.get(slot)
                if req is None:  # cancelled: its slot leaves at the next turn, unless the engine freed it now
                    if finish:
                        self.leaving.discard(slot)
                    continue
                req.steps.append(self.engine.counts["decode_steps"])
                text, hit = req.text.add(token) if token not in req.stop_tokens else ("", False)
                if hit:
                    if finish is None:
                        self.leaving.add(slot)
                    self._end(req, text, "stop")
                elif finish:
                    self._end(req, text + req.text.finish(), finish)
                elif text:
                    req.put(text)

    def _end(self, req: Request, text: str, finish: str):
        req.done = True
        if self.running.get(req.slot) is req:
            del self.running[req.slot]
        req.put(text, finish)
        record = {"id": req.id, "slot": req.slot, "prompt_tokens": len(req.prompt), "completion_tokens": len(req.steps),
                  "finish_reason": finish, "first_step": req.steps[0] if req.steps else None,
                  "last_step": req.steps[-1] if req.steps else None}
        self.history.append(record)
        c = self.engine.counts
        log.info("%s: %d+%d tokens, %s; the server has run %d decode steps, %d prefill chunks for %d tokens", req.id,
                 record["prompt_tokens"], record["completion_tokens"], finish, c["decode_steps"], c["prefill_steps"],
                 c["tokens"])

    def run(self):
        """Process 0's loop (a thread beside the web server)."""
        while True:
            plan = self._plan()
            try:
                if not self.apply(broadcast(plan) if self.multi else plan):
                    return
            except Exception:  # a bug, not a request: answer what is running, keep serving
                log.error("engine turn failed:\n%s", traceback.format_exc())
                with self.lock:
                    for slot, req in list(self.running.items()):
                        self._end(req, "", "length")
                        req.put("", error=ApiError(500, "the engine failed; see the server's log"))
                for slot in range(len(self.engine.rows)):
                    self.engine.leave(slot)
                if self.multi:
                    raise

    def follow(self):
        """The loop of every other process: apply process 0's plans until it stops."""
        while self.apply(broadcast(None)):
            pass

    def metrics(self) -> str:
        c = self.engine.counts
        with self.lock:
            values = {"decode_steps_total": c["decode_steps"], "prefill_steps_total": c["prefill_steps"],
                      "generated_tokens_total": c["tokens"], "reused_prompt_tokens_total": c["reused_tokens"],
                      "requests_running": len(self.running),
                      "requests_waiting": len(self.waiting)}
        return "".join(f"# TYPE lemur_{k} {'counter' if k.endswith('total') else 'gauge'}\nlemur_{k} {v}\n"
                       for k, v in values.items())


class Service:
    """The model behind the endpoints: prompts checked and queued for the scheduler, replies
    streamed or returned whole."""

    def __init__(self, scheduler: Scheduler, prompts: Prompts, name: str, api_key: str | None = None):
        self.scheduler, self.prompts, self.name, self.api_key = scheduler, prompts, name, api_key
        self.context = scheduler.engine.context

    def authorize(self, request):
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "lemur-jax",
                                            "max_model_len": self.context}]}

    async def complete(self, request, kind: str):
        from starlette.responses import JSONResponse, StreamingResponse
        self.authorize(request)
        body = parse_json(await request.body())
        if body.get("model") is not None and body["model"] != self.name:
            raise ApiError(404, f"The model `{body['model']}` does not exist.", "model")
        opts = options(body, kind == "chat")
        prompt = self.prompts.chat(body) if kind == "chat" else self.prompts.completion(body)
        what = "messages" if kind == "chat" else "prompt"
        if opts["max_tokens"] is None:
            if len(prompt) >= self.context:
                raise context_error(self.context, len(prompt), None, what)
            opts["max_tokens"] = self.context - len(prompt)
        elif len(prompt) + opts["max_tokens"] > self.context:
            raise context_error(self.context, len(prompt), opts["max_tokens"], what)
        req = Request(kind, prompt, opts, self.prompts.stop_tokens(kind == "chat"), self.prompts,
                      asyncio.get_running_loop())
        self.scheduler.submit(req)
        if opts["stream"]:
            return StreamingResponse(self._stream(req), media_type="text/event-stream")
        text, finish = "", None
        try:
            while finish is None:
                try:
                    delta, finish, error = await asyncio.wait_for(req.events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if error:
                    raise error
                text += delta
        finally:
            self.scheduler.cancel(req)  # a client gone mid-request frees its slot (no-op when done)
        return JSONResponse(response(kind, req.id, self.name, text, finish, usage(len(prompt), len(req.steps))))

    async def _stream(self, req: Request):
        try:
            if req.kind == "chat":
                yield event(chunk("chat", req.id, self.name, role=True))
            while True:
                delta, finish, error = await req.events.get()
                if error:
                    yield event(error.body())
                    break
                if delta or finish:
                    yield event(chunk(req.kind, req.id, self.name, delta, finish))
                if finish:
                    break
            if req.opts["include_usage"]:
                yield event(usage_chunk(req.kind, req.id, self.name, usage(len(req.prompt), len(req.steps))))
            yield event("[DONE]")
        finally:
            self.scheduler.cancel(req)  # a client gone mid-stream frees its slot


def make_app(service: Service):
    fastapi = readers.optional("fastapi", "run the OpenAI server (pip install fastapi uvicorn)")
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    app = fastapi.FastAPI(title="Lemur in pure JAX: the OpenAI API")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.scheduler.metrics())

    @app.get("/v1/models")
    async def models(request: fastapi.Request):
        service.authorize(request)
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await service.complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await service.complete(request, "text")

    return app


def web_server(service: Service, host: str, port: int):
    """A uvicorn server of the app whose SIGTERM / Ctrl-C ends the running rows and exits cleanly."""
    uvicorn = readers.optional("uvicorn", "run the OpenAI server (pip install fastapi uvicorn)")

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's would re-raise the signal after shutting down: exit 0 instead
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def stop(sig, frame):
                log.warning("signal %d: no new requests; ending the running ones", sig)
                service.scheduler.shutdown()
                self.should_exit = True

            before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in before.items():
                    signal.signal(s, handler)

    return Server(uvicorn.Config(make_app(service), host=host, port=port, log_level="warning"))


def load(path: str, mesh, slots: int, context: int, queue: int = 64, name: str | None = None,
         api_key: str | None = None, dtype: str | None = None) -> Service:
    """A Service of the model at `path` on `mesh` (its scheduler not yet running)."""
    params, cfg, tokenizer = weights.for_serving(path, mesh, dtype)
    engine = decode.Engine(params, cfg, mesh, slots, min(context, cfg.max_seq_len), vocab_size=tokenizer.vocab_size)
    prompts = Prompts(tokenizer, None if weights.is_checkpoint(path) else path)
    return Service(Scheduler(engine, queue), prompts, name or path, api_key)


@contextlib.contextmanager
def running(service: Service, host: str = "127.0.0.1", port: int = 0):
    """The server in threads of this process (tests, benchmarks): yields its base URL."""
    import time
    server = web_server(service, host, port)
    threads = [threading.Thread(target=service.scheduler.run, daemon=True), threading.Thread(target=server.run, daemon=True)]
    for t in threads:
        t.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        service.scheduler.shutdown()
        server.should_exit = True
        for t in threads:
            t.join()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve a model through the OpenAI API with continuous batching.")
    parser.add_argument("path", help="training out_dir, checkpoint directory or Hugging Face directory")
    parser.add_argument("--mesh", help="DATA,FSDP,TENSOR over all devices of all processes (default: one device)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together")
    parser.add_argument("--context", type=int, default=4096, help="prompt + reply tokens per request (at most the model's)")
    parser.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot (beyond: 429)")
    parser.add_argument("--served_model_name", help="the model's name in the API (default: the path)")
    parser.add_argument("--api_key", help="require `Authorization: Bearer KEY` on /v1/")
    parser.add_argument("--dtype", help="compute dtype instead of the model's (float32: as a reference would)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sharding.select_platforms()
    try:
        mesh = config.command_mesh(args.mesh)
    except ValueError as e:
        parser.error(str(e))
    service = load(args.path, mesh, args.slots, args.context, args.queue, args.served_model_name, args.api_key,
                   args.dtype)
    if jax.process_index() != 0:  # process 0 decides; here the same steps run
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # process 0's stop plan ends this one too
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        service.scheduler.follow()
        return
    server = web_server(service, args.host, args.port)
    thread = threading.Thread(target=service.scheduler.run, daemon=True)
    thread.start()
    log.info("serving %s as %r on http://%s:%d/v1 (%d slots of %d tokens)", args.path, service.name, args.host,
             args.port, args.slots, service.context)
    try:
        server.run()
    finally:
        service.scheduler.shutdown()
        thread.join()


if __name__ == "__main__":
    config.command(main)
