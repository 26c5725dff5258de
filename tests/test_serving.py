"""decode.py, the one decode path: batched generation with a KV cache equals greedy decoding by full
forward passes (model.forward, no cache) and transformers' generate, for prompts of different
lengths, on one device and on meshes that split the kv heads, replicate them over groups of chips,
and split the rows; stop tokens per row; sampling; the layout's checks."""
import dataclasses

import jax
import numpy as np
import pytest

import jax.numpy as jnp

import decode
import model
import sharding
from formats import hf

# small GQA model (2 query heads per kv head); output scaled so greedy never sees near-ties
CFG = model.Config(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                   dtype="float32")
PROMPTS = [[1, 17, 42, 99, 5, 63, 8], [1], [1, 7, 7, 7, 30, 2, 90, 11, 3, 50, 4], [1, 100, 64]]
NEW = 12


@pytest.fixture(scope="module")
def params():
    p = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    return {**p, "output": p["output"] * 30}


def greedy_without_cache(params, tokens, n, cfg=CFG):
    """A full forward pass per new token (over the context padded to max_seq_len: one compile)."""
    forward = jax.jit(model.forward, static_argnums=2)
    tokens = list(tokens)
    for _ in range(n):
        padded = jnp.asarray([tokens + [0] * (cfg.max_seq_len - len(tokens))])
        tokens.append(int(jnp.argmax(forward(params, padded, cfg)[0, len(tokens) - 1])))
    return tokens[-n:]


@pytest.fixture(scope="module")
def one_device(params):
    """Each prompt alone, greedy by full forward passes: the reference of every mesh."""
    return [greedy_without_cache(params, p, NEW) for p in PROMPTS]


def on_mesh(params, shape):
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    return decode.reshard(params, CFG, mesh), mesh


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 2), (1, 1, 4), (2, 1, 2), (1, 2, 4)],
                         ids=["one", "kv-split", "kv-replicated", "rows-data", "rows-fsdp-kv-replicated"])
def test_batched_greedy_on_a_mesh_equals_each_prompt_alone(params, one_device, shape):
    sharded, mesh = on_mesh(params, shape)
    assert decode.generate(sharded, CFG, mesh, PROMPTS, NEW) == one_device
    assert len({tuple(o) for o in one_device}) == len(PROMPTS) and all(len(set(o)) > 3 for o in one_device)


def test_each_prompt_equals_transformers_generate(params, one_device, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf.save_hf(params, CFG, str(tmp_path), dtype="float32")
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # exactly NEW tokens, as ours without stop tokens
    sharded, mesh = on_mesh(params, (1, 2, 4))
    ours = decode.generate(sharded, CFG, mesh, PROMPTS, NEW)
    for prompt, out in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()


def test_stop_tokens_per_row_context_and_sampling(params, one_device):
    sharded, mesh = on_mesh(params, (2, 1, 2))
    assert decode.generate(sharded, CFG, mesh, PROMPTS, NEW, prefill_chunk=3) == one_device  # 4 chunks of 3
    stop = one_device[0][3]  # row 0 stops after 4 tokens; each other row at its own first `stop`, if any
    expected = [o[:o.index(stop) + 1] if stop in o else o for o in one_device]
    assert decode.generate(sharded, CFG, mesh, PROMPTS, NEW, stop_tokens=(stop,)) == expected
    long = decode.generate(sharded, CFG, mesh, [[1] * 60, [1, 2]], 1000)
    assert [len(o) for o in long] == [4, 62]  # each row stops at the context (64)
    assert decode.generate(sharded, CFG, mesh, PROMPTS, NEW, temperature=1.0, top_k=1, seed=5) == one_device
    draws = [decode.generate(sharded, CFG, mesh, PROMPTS, NEW, temperature=2.0, seed=s) for s in (1, 1, 2)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_meshes_the_layout_cannot_split_are_refused(params):
    with pytest.raises(ValueError, match="n_heads=6 does not divide by the mesh's tensor axis"):
        decode.check(dataclasses.replace(CFG, n_heads=6, n_kv_heads=2), {"tensor": 4})
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        decode.check(dataclasses.replace(CFG, n_kv_heads=4, n_heads=8), {"tensor": 6})
    sharded, mesh = on_mesh(params, (1, 1, 1))
    with pytest.raises(ValueError, match="context of 64"):
        decode.generate(sharded, CFG, mesh, [[1] * 64], 4)


def run_engine(engine, joins: dict) -> dict:
    """Advance `engine` until idle; joins {advance number: [(slot, prompt, max_new, options)]}:
    each slot's tokens, and the decode step count at each of them."""
    out, when, turn = {}, {}, 0
    while engine.busy() or any(t >= turn for t in joins):
        for slot, prompt, new, options in joins.get(turn, []):
            engine.join(slot, prompt, new, **options)
            out[slot], when[slot] = [], []
        for slot, token, _ in engine.advance():
            out[slot].append(token)
            when[slot].append(engine.counts["decode_steps"])
        turn += 1
    return out, when


def test_engine_rows_joining_mid_decode_equal_each_alone(params, one_device):
    """Continuous batching: prompts joining the running batch at different steps, in any slot,
    each give what they give alone; a seeded sampled row gives the same tokens in another slot
    beside other rows; a row that finishes frees its slot for the next."""
    sharded, mesh = on_mesh(params, (1, 2, 2))
    engine = decode.Engine(sharded, CFG, mesh, slots=4, context=64, prefill_chunk=4)
    sampled = dict(temperature=2.0, top_p=0.9, seed=decode.row_seed(7))
    alone, _ = run_engine(engine, {0: [(2, PROMPTS[0], NEW, sampled)]})
    joins = {0: [(0, PROMPTS[2], NEW, {}), (1, PROMPTS[1], 3, {})], 2: [(3, PROMPTS[3], NEW, {})],
             5: [(1, PROMPTS[0], NEW, sampled)], 6: [(2, PROMPTS[1], NEW, {})]}
    out, when = run_engine(engine, joins)
    assert out[0] == one_device[2] and out[3] == one_device[3] and out[2] == one_device[1]
    assert out[1] == alone[2] and out[1] != one_device[0]  # slot 1 again: the seeded row, sampled
    assert when[3][0] < when[0][-1] and engine.counts["decode_steps"] < engine.counts["tokens"]


def test_a_prompt_continuing_a_slots_last_row_reuses_its_cache(params, one_device):
    """The next turn of a conversation (the last prompt, its reply, more tokens) joins the slot
    that holds them and prefills only the rest, giving what a fresh engine gives; a prompt that
    differs early reuses only the common start; a row left mid-prefill keeps what it wrote."""
    sharded, mesh = on_mesh(params, (1, 2, 2))
    engine = decode.Engine(sharded, CFG, mesh, slots=2, context=64, prefill_chunk=4)
    first, _ = run_engine(engine, {0: [(1, PROMPTS[0], NEW, {})]})
    assert first[1] == one_device[0]
    follow = PROMPTS[0] + first[1] + [9, 4, 77]
    assert engine.reusable(1, follow) == len(PROMPTS[0]) + NEW - 1 and engine.reusable(0, follow) == 0
    fresh = decode.generate(sharded, CFG, mesh, [follow, follow[:3] + [5, 6]], NEW)
    out, _ = run_engine(engine, {0: [(1, follow, NEW, {})]})
    assert out[1] == fresh[0] and engine.counts["reused_tokens"] == len(PROMPTS[0]) + NEW - 1
    out, _ = run_engine(engine, {0: [(1, follow[:3] + [5, 6], NEW, {})]})
    assert out[1] == fresh[1] and engine.counts["reused_tokens"] == len(PROMPTS[0]) + NEW - 1 + 3
    engine.join(0, follow, NEW)
    engine.advance()  # one chunk of 4 prefilled, then left
    engine.leave(0)
    assert engine.reusable(0, follow) == 4
