"""sample.py and decoding on one device (decode.py on the mesh (1, 1, 1)): KV-cache generation equals
full forward passes and Hugging Face; stop tokens, the context, sampling options; loading
checkpoints and Hugging Face directories."""
import dataclasses
import io
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

import chat
import decode
import model
import sample
import sharding
from formats import checkpoint, hf, weights
from test_serving import greedy_without_cache

# small GQA model (2 query heads per kv head); output scaled so greedy never sees near-ties
CFG = model.Config(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                   dtype="float32")
PROMPT = [1, 17, 42, 99, 5, 63, 8]


@pytest.fixture(scope="module")
def params():
    p = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    return {**p, "output": p["output"] * 30}


def one_device():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def load(path):
    """(params in training's layout on one device, model config, tokenizer) of a checkpoint or a
    Hugging Face directory."""
    return weights.load(path, lambda cfg: sharding.param_structs(cfg, one_device()))


def generate(params, prompt, n, cfg=CFG, **options):
    """One prompt through decode.py on one device."""
    mesh = one_device()
    return decode.generate(decode.reshard(params, cfg, mesh), cfg, mesh, [prompt], n, **options)[0]


def test_cached_greedy_equals_full_forward_each_step(params):
    out = generate(params, PROMPT, 24)
    assert out == greedy_without_cache(params, PROMPT, 24)
    assert len(set(out)) > 3  # not a degenerate constant sequence


def test_greedy_equals_transformers_generate(params, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf.save_hf(params, CFG, str(tmp_path), dtype="float32")
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ours without stop tokens
    with torch.no_grad():
        ref = theirs.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert generate(params, PROMPT, 16) == ref[0, len(PROMPT):].tolist()


def test_stop_tokens_context_and_vocab_limit(params):
    greedy = generate(params, PROMPT, 10)
    assert generate(params, PROMPT, 10, stop_tokens=(greedy[3],)) == greedy[:greedy.index(greedy[3]) + 1]
    assert len(generate(params, PROMPT, 1000)) == CFG.max_seq_len - len(PROMPT)  # stops at the context
    assert max(generate(params, PROMPT, 10, vocab_size=min(greedy))) < min(greedy)
    with pytest.raises(ValueError, match="prompts of \\[64\\] tokens.*context of 64"):
        generate(params, [1] * 64, 5)


def test_sampling_options(params):
    greedy = generate(params, PROMPT, 8)
    assert generate(params, PROMPT, 8, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(params, PROMPT, 8, temperature=1.0, top_p=1e-6, seed=3) == greedy
    draws = [generate(params, PROMPT, 8, temperature=2.0, seed=s) for s in (1, 1, 2)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    counts = lambda **kw: np.bincount(np.asarray(jax.vmap(lambda k: decode.sample_logits(logits, k, 1.0, kw['top_k'], kw['top_p'])[0])(keys)),
                                      minlength=4)
    assert counts(top_k=2, top_p=1.0)[2:].sum() == 0 and counts(top_k=3, top_p=1.0)[2] > 0
    assert counts(top_k=0, top_p=0.75)[2:].sum() == 0 and counts(top_k=0, top_p=0.85)[2] > 0  # 0.5 + 0.3 reaches 0.8


def test_load_hf_directory_with_added_tokens(params, tmp_path):
    lines = [f"word{i % 50} text {i}" for i in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=123,
                                   byte_fallback=False, num_threads=1, pad_id=-1, minloglevel=2)
    hf.save_hf(params, CFG, str(tmp_path), dtype="float32")
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 124, "<|im_start|>": 123}))
    p, cfg, tok = load(str(tmp_path))
    assert cfg == dataclasses.replace(CFG, dtype="bfloat16") and tok.added == {"<|im_start|>": 123, "<|im_end|>": 124}
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 125}))
    with pytest.raises(ValueError, match="without gaps"):
        load(str(tmp_path))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A 100-piece sentencepiece model (its 100 + 5 chat tokens fit CFG's vocabulary of 128)."""
    lines = [f"word{i % 40} text {i} of the data" for i in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=100,
                                   byte_fallback=False, num_threads=1, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tok.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_a_moved_checkpoint_samples_with_its_own_tokenizer(params, spm_model, tmp_path):
    """The checkpoint holds a copy of the tokenizer and its added tokens: deleting the original
    file and moving the checkpoint elsewhere changes nothing."""
    original = tmp_path / "tokenizer_elsewhere.model"
    shutil.copyfile(spm_model, original)
    tok = chat.chat_tokenizer(str(original))
    checkpoint.save(str(tmp_path / "run"), 3, {"params": params}, {}, {"model": dataclasses.asdict(CFG)}, 1, tok)
    original.unlink()
    shutil.move(tmp_path / "run", tmp_path / "moved")
    p, cfg, loaded = load(str(tmp_path / "moved"))
    assert cfg == CFG and loaded.added == tok.added and loaded.vocab_size == 105
    assert loaded.encode("<|im_start|>word3 text") == tok.encode("<|im_start|>word3 text")
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))


@pytest.mark.parametrize("option, value", [("temperature", -1.0), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5)])
def test_sampling_options_that_cannot_be_right_are_refused(params, option, value, capsys):
    with pytest.raises(ValueError, match=f"{option}="):
        decode.check_options(**{"temperature": 0.0, "top_k": 0, "top_p": 1.0, option: value})
    with pytest.raises(SystemExit):  # before anything is loaded: the path does not even exist
        sample.main(["/nonexistent", "--prompt", "x", f"--{option}={value}"])
    assert f"{option}=" in capsys.readouterr().err


def test_quiet_on_a_machine_without_tpu_chips(params, spm_model, tmp_path):
    """With jax[tpu] installed (the test requirements bring libtpu) and no TPU chips attached, a
    command must not start libtpu, which prints errors while it looks for chips."""
    from conftest import HANG, ROOT, subprocess_env
    hf.save_hf(params, CFG, str(tmp_path), dtype="float32")
    shutil.copyfile(spm_model, tmp_path / "tokenizer.model")
    env = {k: v for k, v in subprocess_env().items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "sample.py", str(tmp_path), "--prompt", "word1", "--max_new_tokens", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0 and out.stdout.startswith("word1"), out.stderr[-2000:]
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr[-2000:]


def test_sample_on_a_mesh_prints_what_one_device_prints(params, spm_model, tmp_path, capsys):
    """python sample.py HF_DIR --mesh=1,2,4 --prompt A --prompt B: the prompts decoded as one batch
    on 8 devices (decode.py), from params read slice by slice in the serving layout."""
    hf.save_hf(params, CFG, str(tmp_path), dtype="float32")
    shutil.copyfile(spm_model, tmp_path / "tokenizer.model")
    prompts = ["--prompt", "word1", "--prompt", "word7 text 12 of the", "--max_new_tokens", "6"]
    sample.main([str(tmp_path), *prompts])
    alone = capsys.readouterr().out
    sample.main([str(tmp_path), *prompts, "--mesh=1,2,4"])
    assert capsys.readouterr().out == alone and len(alone.splitlines()) >= 2
    with pytest.raises(ValueError, match="n_heads=4 does not divide by the mesh's tensor axis"):
        sample.main([str(tmp_path), *prompts, "--mesh=1,1,8"])
