"""model.py, attention.py and hf.py against Hugging Face transformers' LlamaForCausalLM (fp32, CPU)."""
import dataclasses
import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import attention
import model
from formats import hf

# grouped-query attention (6 query heads on 2 kv heads) and odd sizes everywhere else
CFG = model.Config(vocab_size=101, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=100,
                   max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5, dtype="float32")
TOL = 1e-4


def hf_config(cfg):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(hf_config(CFG)).eval()
    with torch.no_grad():  # random norm scales too, so a norm read from the wrong place shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return m


def from_state_dict(sd, cfg):
    """HF state dict -> our params, written out independently of hf.py."""
    t = lambda name: sd[name].detach().numpy()
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
    layer = lambda fmt, f: np.stack([f(t(fmt.format(i))) for i in range(cfg.n_layers)])
    p = "model.layers.{}."
    return jax.tree.map(jnp.asarray, {
        "embed": t("model.embed_tokens.weight"),
        "layers": {
            "attn_norm": layer(p + "input_layernorm.weight", lambda w: w),
            "wq": layer(p + "self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H)),
            "wk": layer(p + "self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H)),
            "wv": layer(p + "self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H)),
            "wo": layer(p + "self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D)),
            "mlp_norm": layer(p + "post_attention_layernorm.weight", lambda w: w),
            "w_gate": layer(p + "mlp.gate_proj.weight", lambda w: w.T),
            "w_up": layer(p + "mlp.up_proj.weight", lambda w: w.T),
            "w_down": layer(p + "mlp.down_proj.weight", lambda w: w.T),
        },
        "norm": t("model.norm.weight"),
        "output": t("lm_head.weight").T,
    })


def hf_logits(m, tokens):
    with torch.no_grad():
        return m(torch.tensor(np.asarray(tokens))).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 33))


def max_diff(params, m, cfg=CFG):
    ours = np.asarray(model.forward(params, jnp.asarray(TOKENS), cfg))  # not jitted: tests patch model
    return np.abs(ours - hf_logits(m, TOKENS)).max()


@pytest.mark.parametrize("block", [128, 8, 7])  # T = 32: one query block, 4 blocks, 5 uneven ones
def test_logits_match_transformers(hf_model, monkeypatch, block):
    monkeypatch.setattr(attention, "flash_attention", partial(attention.flash_attention, block=block))
    assert max_diff(from_state_dict(hf_model.state_dict(), CFG), hf_model) <= TOL


def test_grads_match_transformers(hf_model, monkeypatch):
    """Every d loss / d param against torch autograd through HF's model: checks the hand-written
    attention backward (5 uneven query blocks here) along with everything JAX differentiates."""
    monkeypatch.setattr(attention, "flash_attention", partial(attention.flash_attention, block=7))
    params = from_state_dict(hf_model.state_dict(), CFG)
    hf_model.zero_grad()
    tokens = torch.tensor(TOKENS)
    hf_loss = hf_model(tokens, labels=tokens).loss  # mean CE of tokens[:, 1:] given what precedes
    hf_loss.backward()
    theirs = from_state_dict({name: p.grad for name, p in hf_model.named_parameters()}, CFG)
    hf_model.zero_grad()
    loss, ours = jax.value_and_grad(model.loss_fn)(params, jnp.asarray(TOKENS), CFG)
    assert abs(float(loss) - hf_loss.item()) <= TOL
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(theirs)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("broken", ["rope_layout", "kv_grouping"])
def test_parity_test_catches_broken_model(hf_model, monkeypatch, broken):
    """The parity check above must fail when RoPE or the kv-head grouping is wrong."""
    if broken == "rope_layout":  # interleaved pairs (Meta's original layout) instead of rotate-half
        def apply_rope(x, cos, sin):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            c, s = cos[:, None, : x.shape[-1] // 2], sin[:, None, : x.shape[-1] // 2]
            return jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).reshape(x.shape)
        monkeypatch.setattr(model, "apply_rope", apply_rope)
    else:  # query head n served by kv head n % K instead of n // G
        attend = attention.flash_attention
        def interleaved(q, k, v, segment_ids):
            B, T, N, H = q.shape
            K = k.shape[2]
            q = q.reshape(B, T, N // K, K, H).swapaxes(2, 3).reshape(B, T, N, H)
            out = attend(q, k, v, segment_ids)
            return out.reshape(B, T, K, N // K, H).swapaxes(2, 3).reshape(B, T, N, H)
        monkeypatch.setattr(attention, "flash_attention", interleaved)
    assert max_diff(from_state_dict(hf_model.state_dict(), CFG), hf_model) > 10 * TOL  # the parity test would fail


def test_hf_files_to_ours(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with an index
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    cfg, params = hf.load_hf(str(tmp_path))
    assert dataclasses.replace(cfg, dtype="float32") == CFG
    assert max_diff(params, hf_model, CFG) <= TOL


def test_ours_to_hf_files(tmp_path):
    params = model.init_params(CFG, jax.random.key(1))
    hf.save_hf(params, CFG, str(tmp_path), dtype="float32", max_shard_bytes=30_000)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert max_diff(params, m) <= TOL


def test_sharded_load_reads_slices(hf_model, tmp_path):
    """Loading straight into sharded arrays gives the same params as the whole-model load."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    hf_model.save_pretrained(tmp_path)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
    specs = {"embed": P(None, "fsdp"), "norm": P(), "output": P("fsdp", None),  # vocab 101 is odd
             "layers": {"attn_norm": P(), "mlp_norm": P(), "wq": P(None, "fsdp", "tensor"),
                        "wk": P(None, "fsdp", "tensor"), "wv": P(None, "fsdp", "tensor"),
                        "wo": P(None, "tensor", None, "fsdp"), "w_gate": P(None, "fsdp", "tensor"),
                        "w_up": P(None, "fsdp", "tensor"), "w_down": P(None, "tensor", "fsdp")}}
    specs["layers"]["wq"] = P("fsdp", None, "tensor")  # layer axis sliced too
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
    _, sharded = hf.load_hf(str(tmp_path), shardings)
    _, full = hf.load_hf(str(tmp_path))
    for a, b, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(full), jax.tree.leaves(shardings)):
        assert a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- bad input

def _saved(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    with open(path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("key,value,match", [
    ("model_type", "mistral", "model_type"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("attention_bias", True, "attention_bias"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_unsupported_config_is_named(hf_model, tmp_path, key, value, match):
    path = _saved(hf_model, tmp_path)
    _edit_config(path, **{key: value})
    with pytest.raises(ValueError, match=match):
        hf.load_hf(str(path))


def test_bad_tensors_are_named(hf_model, tmp_path):
    import safetensors.torch as st
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    cases = {
        "missing tensor.*model.layers.1.mlp.up_proj.weight": {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
        "unexpected tensor.*model.layers.1.mlp.extra.weight": {**sd, "model.layers.1.mlp.extra.weight": torch.zeros(3)},
        "model.layers.0.self_attn.k_proj.weight has shape": {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(24, 48)},
    }
    hf_model.config.save_pretrained(tmp_path)
    for match, tensors in cases.items():
        st.save_file(tensors, str(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            hf.load_hf(str(tmp_path))


# ----------------------------------------------------------------------------- model properties

@pytest.mark.parametrize("cfg,count", [(model.LLAMA2_7B, 6_738_415_616), (model.LLAMA2_13B, 13_015_864_320),
                                       (model.LLAMA2_70B, 68_976_648_192)])
def test_preset_param_counts(cfg, count):
    assert model.param_count(cfg) == count


def test_causal():
    """The loss at position t has zero gradient w.r.t. the embeddings of tokens after t."""
    params = model.init_params(CFG, jax.random.key(2))
    T, t = 24, 10
    tokens = jnp.arange(T + 1)[None] * 3 % CFG.vocab_size  # distinct tokens, so rows identify positions
    weights = jnp.zeros((1, T)).at[0, t].set(1.0)
    grad = jax.grad(model.loss_fn)(params, tokens, CFG, weights)["embed"]
    row_norm = np.abs(np.asarray(grad)).sum(-1)
    assert (row_norm[np.asarray(tokens[0, : t + 1])] > 0).all()
    assert (row_norm[np.asarray(tokens[0, t + 1:])] == 0).all()


def test_remat_policies_agree():
    params = model.init_params(CFG, jax.random.key(3))
    tokens = jnp.asarray(TOKENS)
    grads = {r: jax.grad(model.loss_fn)(params, tokens, dataclasses.replace(CFG, remat=r))
             for r in ("none", "full", "dots")}
    for r in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[r])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_document_mask_isolates_documents():
    """With segment ids, a packed document's logits equal the document run alone (RoPE is
    relative, so its offset in the row does not matter)."""
    params = model.init_params(CFG, jax.random.key(4))
    tokens = jnp.asarray(TOKENS[:1])
    seg = jnp.asarray([[0] * 13 + [1] * 20])
    packed = model.forward(params, tokens, CFG, seg)
    alone = model.forward(params, tokens[:, 13:], CFG)
    np.testing.assert_allclose(packed[:, 13:], alone, atol=1e-4)
    unmasked = model.forward(params, tokens, CFG)
    assert np.abs(unmasked[:, 13:] - alone).max() > 1e-3


def test_loss_weights(hf_model):
    """loss_fn's weighted mean against torch's cross-entropy on transformers' logits."""
    params = from_state_dict(hf_model.state_dict(), CFG)
    tokens = TOKENS
    with torch.no_grad():
        logits = hf_model(torch.tensor(tokens[:, :-1])).logits
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(tokens[:, 1:]).flatten(),
                                                   reduction="none").reshape(tokens[:, 1:].shape).numpy()
    w = np.random.default_rng(1).integers(0, 2, losses.shape).astype(np.float32)
    np.testing.assert_allclose(model.loss_fn(params, jnp.asarray(tokens), CFG, jnp.asarray(w)),
                               (losses * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(model.loss_fn(params, jnp.asarray(tokens), CFG), losses.mean(), rtol=1e-5)
