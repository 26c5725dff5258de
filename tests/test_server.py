"""evaluation/server.py through the `openai` client, on a tiny chat model exported as a Hugging Face
directory (with its ChatML template), served on 127.0.0.1: replies equal transformers' greedy
ones; streams equal whole replies; concurrent requests equal each alone while sharing decode steps;
seeded sampling independent of slot and neighbours; stop strings; OpenAI-shaped errors; a mesh and
two processes serve what one device does; a client that goes away frees its slot; SIGTERM ends
running rows and exits 0. Where an order matters (who joins while whom decodes) the test lets the
engine advance turn by turn (`stepping`); verdicts come from the server's records, never timings."""
import contextlib
import io
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import sentencepiece as spm

import chat
import model
import sharding
from conftest import HANG
from formats import hf

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from evaluation import server  # noqa: E402

CFG = model.Config(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
                   dtype="float32")
CONTEXT = 128
QUESTIONS = ["word3 text", "the data of word7 text 12", "hi", "text 5 of the data word1 word2 word3 text 9",
             "word9", "of the data", "word12 text 40 of", "data data data text word30 of the text 8 word4"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny Llama with Lemur-Chat's vocabulary as `tools.convert` exports a chat run: a
    Hugging Face directory with tokenizer.model, added_tokens.json and the ChatML chat_template.
    Its output is scaled so greedy never sees near-ties."""
    rng = np.random.default_rng(0)
    words = ["word", "text", "of", "the", "data", "system", "user", "assistant", "be", "brief", "hi", "reads"]
    lines = [" ".join(rng.choice(words, 6)) + f" {i}" for i in range(1000)]
    buf = io.BytesIO()  # byte fallback, newlines never merged, as Llama's
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=300,
                                   byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   num_threads=1, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("tiny_chat_hf")
    (path / "spm.model").write_bytes(buf.getvalue())
    tokenizer = chat.chat_tokenizer(str(path / "spm.model"))
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    # byte pieces, eos, <|im_end|> and the padded vocabulary get logit 0, below the best of the ~40 word
    # pieces: replies are words, as a trained model's, and long (they end at max_tokens or a stop string)
    quiet = [i for i in range(300) if tokenizer.sp.is_byte(i)] + list(range(tokenizer.vocab_size, CFG.vocab_size)) + [
        tokenizer.eos_id, tokenizer.added["<|im_end|>"]]
    output = params["output"].at[:, quiet].set(0.0) * 30
    hf.save_hf({**params, "output": output}, CFG, str(path), dtype="float32")
    tokenizer.save(str(path), chat.CHAT_TEMPLATE)
    return str(path)


def devices(n):
    return sharding.make_mesh(*n, devices=jax.devices()[:int(np.prod(n))])


@pytest.fixture(scope="module")
def service(exported):
    return server.load(exported, devices((1, 1, 1)), slots=8, context=CONTEXT, queue=8, name="tiny", dtype="float32")


@pytest.fixture(scope="module")
def client(service):
    with server.running(service) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def ask(client, question, **options):
    """(reply text, finish_reason, completion tokens) of a one-turn chat, greedy unless told."""
    options = {"temperature": 0.0, "max_tokens": 24, **options}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], **options)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


def ask_together(client, questions, options):
    """ask() for each (question, options) pair, all at once: one thread a request."""
    results = [None] * len(questions)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(client, questions[i], **options[i])))
               for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def wait_for(condition, what: str, timeout: float = HANG):
    """Wait for a state of the server (never a verdict on speed: the timeout only ends a hang)."""
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"waited {timeout} s for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def stepping(service):
    """The engine runs a turn only when the test releases one (gate.release(n)); all at the end."""
    engine, gate = service.scheduler.engine, threading.Semaphore(0)
    advance = engine.advance

    def gated():
        gate.acquire()
        return advance()

    engine.advance = gated
    try:
        yield gate
    finally:
        engine.advance = advance
        gate.release(1 << 20)


def turns(gate, service, n=1):
    """Let the engine run n turns, waiting for each."""
    for _ in range(n):
        before = counts(service)
        gate.release(1)
        wait_for(lambda: counts(service) != before, "a turn of the engine")


def admit(gate, service, n):
    """Wait until n requests have arrived, then run turns until all n hold slots."""
    scheduler = service.scheduler
    wait_for(lambda: len(scheduler.running) + len(scheduler.waiting) == n, f"{n} requests to arrive")
    while len(scheduler.running) < n:
        turns(gate, service)


def record(service, rid):
    return next(r for r in service.scheduler.history if r["id"] == rid)


def counts(service):
    return dict(service.scheduler.engine.counts)


def test_greedy_chat_equals_transformers(client, exported):
    """The same conversation, the exported model: transformers' apply_chat_template + greedy
    generate (stopping at eos or <|im_end|>) gives our reply, token count included."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers converts tokenizer.model with protobuf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    theirs = transformers.LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for question in QUESTIONS[:3]:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = theirs.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=stop,
                                  pad_token_id=0)[0, len(ids):].tolist()
        r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30)
        assert r.choices[0].message.content == tokenizer.decode(out, skip_special_tokens=True)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))
        assert r.choices[0].finish_reason == ("stop" if out[-1] in stop else "length")


def test_streams_concatenate_to_the_whole_reply(client, service):
    import httpx
    whole = ask(client, QUESTIONS[1], max_tokens=40)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and len(chunks) > 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole[1]
    assert chunks[-1].usage.completion_tokens == whole[2] and not chunks[-1].choices
    text = client.completions.create(model="tiny", prompt="word3 text 7", temperature=0, max_tokens=20).choices[0]
    pieces = list(client.completions.create(model="tiny", prompt="word3 text 7", temperature=0, max_tokens=20,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text.text and pieces[-1].choices[0].finish_reason == text.finish_reason
    raw = httpx.post(str(client.base_url) + "completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"


def test_concurrent_requests_equal_each_alone_and_share_decode_steps(client, service):
    """8 requests of different prompt lengths and max_tokens, the last 4 arriving while the first 4
    decode: each equals itself run alone, and the steps show they overlapped."""
    sizes = [40, 7, 25, 33, 12, 50, 3, 18]
    alone = [ask(client, q, max_tokens=n) for q, n in zip(QUESTIONS, sizes)]
    assert len({a[0] for a in alone}) == 8 and sum(a[2] for a in alone) > 120
    before, results = counts(service), [None] * 8

    def run(i):
        results[i] = ask(client, QUESTIONS[i], max_tokens=sizes[i])

    with stepping(service) as gate:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads[:4]:
            t.start()
        admit(gate, service, 4)
        turns(gate, service, 2)  # the first 4 prefilled and decoding
        for t in threads[4:]:
            t.start()
        admit(gate, service, 8)
    for t in threads:
        t.join()
    assert results == alone
    after = counts(service)
    tokens, steps = after["tokens"] - before["tokens"], after["decode_steps"] - before["decode_steps"]
    assert tokens == sum(a[2] for a in alone) and max(sizes) - 1 <= steps < tokens / 2  # up to 8 rows a step


def test_a_short_request_sent_during_a_long_one_finishes_first(client, service):
    ids = {}

    def run(name, n):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           temperature=0, max_tokens=n)
        ids[name] = r.id

    with stepping(service) as gate:
        long = threading.Thread(target=run, args=("long", 80))
        long.start()
        admit(gate, service, 1)
        turns(gate, service, 5)
        short = threading.Thread(target=run, args=("short", 6))
        short.start()
        admit(gate, service, 2)
    long.join(), short.join()
    a, b = record(service, ids["long"]), record(service, ids["short"])
    assert a["first_step"] < b["first_step"] and b["last_step"] < a["last_step"]  # joined later, left first
    assert (a["completion_tokens"], b["completion_tokens"]) == (80, 6)


def test_a_seeded_request_gives_the_same_text_in_any_slot_beside_any_others(client, service):
    seeded = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=30)
    engine = service.scheduler.engine
    engine.kept = [np.zeros(0, np.int32)] * len(engine.rows)  # no slot holds a prompt: the first free one is taken
    alone = ask(client, QUESTIONS[2], **seeded)
    assert service.scheduler.history[-1]["slot"] == 0
    assert alone == ask(client, QUESTIONS[2], **seeded)
    assert alone != ask(client, QUESTIONS[2], **{**seeded, "seed": 1235})
    assert alone[0] != ask(client, QUESTIONS[2], max_tokens=30)[0]  # sampled, not greedy
    results = {}

    def run(name, question, **options):
        results[name] = ask(client, question, **options)

    with stepping(service) as gate:  # three others take slots 0-2 first and keep decoding beside it in slot 3
        others = [threading.Thread(target=run, args=(i, QUESTIONS[i + 3]), kwargs=dict(temperature=1.0, max_tokens=40))
                  for i in range(3)]
        for t in others:
            t.start()
        admit(gate, service, 3)
        turns(gate, service, 4)
        mine = threading.Thread(target=run, args=("seeded", QUESTIONS[2]), kwargs=seeded)
        mine.start()
        admit(gate, service, 4)
        assert [s for s, r in service.scheduler.running.items() if r.opts["seed"] == 1234] == [3]
    for t in others + [mine]:
        t.join()
    assert results["seeded"] == alone


def test_stop_strings_end_the_reply(client, service):
    text, finish, n = ask(client, QUESTIONS[3], max_tokens=40)
    assert finish == "length" and len(text) > 20
    cut = text[12:15]
    stops = [f"never{i}" for i in range(7)] + [cut]  # 8 strings (MINT sends 5)
    got = ask(client, QUESTIONS[3], max_tokens=40, stop=stops)
    assert got[0] == text[:text.index(cut)] and got[1] == "stop" and got[2] < n
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[3]}],
                                            temperature=0, max_tokens=40, stop=stops, stream=True)
    chunks = [c.choices[0] for c in stream]
    assert "".join(c.delta.content or "" for c in chunks) == got[0] and chunks[-1].finish_reason == "stop"
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[3]}],
                                            temperature=0, max_tokens=40, stop=stops[:7], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text  # what was held back comes at the end
    wait_for(lambda: not service.scheduler.engine.busy(), "the stopped row to leave its slot")


def test_bad_requests_get_openai_errors_and_the_server_serves_on(client, service):
    import httpx
    url = str(client.base_url)
    raw = httpx.post(url + "chat/completions", content=b'{"model": "tiny", "messages": [', timeout=30)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    messages = [{"role": "user", "content": "hi"}]
    for field, value in [("max_tokens", 0), ("max_tokens", "ten"), ("temperature", -1), ("top_p", 0), ("top_p", 1.5),
                         ("stop", 5), ("seed", "x"), ("stream", "yes")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages, extra_body={field: value})
        assert e.value.status_code == 400 and e.value.body["param"] == field, (field, e.value.body)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages="hi")
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=messages)
    long = " ".join(["word1 text"] * 60)
    with pytest.raises(openai.BadRequestError, match=f"This model's maximum context length is {CONTEXT} tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], max_tokens=10)
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {CONTEXT} tokens"):
        client.completions.create(model="tiny", prompt="word1", max_tokens=CONTEXT)
    assert ask(client, "hi", extra_body={"unknown_field": 1, "frequency_penalty": 0})[1] == "length"  # ignored
    assert httpx.get(url.replace("/v1/", "/health")).status_code == 200
    assert [m.id for m in client.models.list()] == ["tiny"]
    metrics = httpx.get(url.replace("/v1/", "/metrics")).text
    assert "lemur_decode_steps_total" in metrics
    assert int(re.search(r"lemur_reused_prompt_tokens_total (\d+)", metrics).group(1)) > 0  # questions asked again


def test_an_api_key_is_required_when_set(client, service):
    service.api_key = "secret"
    try:
        with pytest.raises(openai.AuthenticationError):
            ask(client, "hi")
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        keyed = openai.OpenAI(base_url=str(client.base_url), api_key="secret", max_retries=0)
        assert ask(keyed, "hi") == ask(keyed, "hi")
    finally:
        service.api_key = None


def test_a_mesh_serves_what_one_device_serves(client, exported):
    """(1, 2, 2): slots split over fsdp, heads over tensor; the requests run together."""
    options = [dict(max_tokens=20), dict(max_tokens=9), dict(temperature=1.0, seed=7, max_tokens=20), dict(max_tokens=14)]
    alone = [ask(client, q, **o) for q, o in zip(QUESTIONS, options)]
    meshed = server.load(exported, devices((1, 2, 2)), slots=4, context=CONTEXT, name="tiny", dtype="float32")
    with server.running(meshed) as url:
        other = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        results = ask_together(other, QUESTIONS[:4], options)
    assert results == alone


def test_a_client_gone_mid_stream_frees_its_slot_and_shutdown_ends_the_rows(exported):
    """--slots 1 --queue 1: A streams, B waits, C is refused (429); A's client goes away: B is served."""
    import httpx
    one = server.load(exported, devices((1, 1, 1)), slots=1, context=CONTEXT, queue=1, name="tiny", dtype="float32")
    with server.running(one) as url, stepping(one) as gate:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True,
                "temperature": 0}
        done = {}
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as a:
            lines = a.iter_lines()
            gate.release(2)
            assert next(lines).startswith("data: ") and next(l for l in lines if l)  # the role, then text
            b = threading.Thread(target=lambda: done.setdefault("b", ask(c, QUESTIONS[1], max_tokens=10)))
            b.start()
            wait_for(lambda: len(one.scheduler.waiting) == 1, "B to wait")
            with pytest.raises(openai.RateLimitError):
                ask(c, "hi")
        # A's connection is closed: let the engine run until the server notices (as it streams A's next token)
        end = time.time() + 120
        while "b" not in done and time.time() < end:
            gate.release(1)
            time.sleep(0.01)
            assert counts(one)["tokens"] < 100, "A ran to its end: its slot was not freed"
        b.join()
        assert done["b"][2] == 10 and [r["completion_tokens"] for r in one.scheduler.history][-1] == 10
        while gate.acquire(blocking=False):  # turns released but not run: none left for what follows
            pass

        # what SIGTERM does (the signal itself: the two-process test): C decoding, D waiting, then a
        # shutdown: C ends with a finish_reason after the tokens it had, D gets 503, nothing new is taken
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        admit(gate, one, 1)
        turns(gate, one, 3)
        d = threading.Thread(target=lambda: done.setdefault("d", pytest.raises(openai.InternalServerError, ask, c, "hi")))
        d.start()
        wait_for(lambda: len(one.scheduler.waiting) == 1, "D to wait")
        one.scheduler.shutdown()
        gate.release(1 << 20)
        chunks = list(stream)
        d.join()
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens < 10
    assert done["d"].value.status_code == 503 and "shutting down" in str(done["d"].value)


def test_two_processes_serve_what_one_does_and_sigterm_ends_cleanly(client, exported, tmp_path):
    """python -m evaluation.server HF_DIR --mesh=1,2,2 on 2 processes x 2 devices (gloo collectives):
    the slots split over the processes; the replies equal the one-device server's. SIGTERM to
    process 0 during a stream: it ends with a finish_reason and [DONE], and both exit 0."""
    import httpx
    from conftest import ROOT, subprocess_env
    from test_sharding import free_port
    options = [dict(max_tokens=20), dict(temperature=1.0, seed=3, max_tokens=16), dict(max_tokens=11),
               dict(max_tokens=25, stop=["d"])]
    alone = [ask(client, q, **o) for q, o in zip(QUESTIONS[4:], options)]
    coordinator, port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "evaluation.server", exported, "--mesh=1,2,2", "--slots=4",
                               f"--context={CONTEXT}", f"--port={port}", "--served_model_name=tiny", "--dtype=float32"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=subprocess_env(devices=2, JAX_COORDINATOR_ADDRESS=f"localhost:{coordinator}",
                                                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                                 JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"))
             for i in range(2)]
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert all(p.poll() is None for p in procs), "a server process died"
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "the two-process server to start")
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert ask_together(c, QUESTIONS[4:8], options) == alone
        stream = iter(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=100, stream=True, temperature=0,
                                                stream_options={"include_usage": True}))
        next(stream), next(stream)
        procs[0].send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage  # ended with a finish_reason
        logs = [p.communicate(timeout=HANG)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n\n".join(logs)[-4000:]
        assert "decode steps" in logs[0]
    finally:
        for p in procs:
            p.kill()
