"""The bundled model jaxinfer/assets/tiny-code against HF transformers, the oracle.

The folder is produced by scripts/train_tiny.py; until it exists these tests skip.
Checks: HF's LlamaForCausalLM and jaxinfer's Transformer give the same logits on
held-out windows; the held-out perplexity of scripts/eval_perplexity.py equals the one
computed with HF on the same windows; the tokenizer round-trips held-out stdlib files.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "jaxinfer", "assets", "tiny-code")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import stdlib_corpus  # noqa: E402

# float32 on both sides; the two frameworks sum in different orders, so logits agree
# to about 1e-6 of their scale. The bound: |ours - hf| <= LOGIT_TOL * max(1, max |hf|).
LOGIT_TOL = 1e-4
# Perplexity is exp(mean NLL over 512 tokens): relative tolerance on it.
PPL_RTOL = 1e-4

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(MODEL_DIR, "model.safetensors")),
    reason=f"bundled model not trained yet: run `python scripts/train_tiny.py` to create {MODEL_DIR}")


@pytest.fixture(scope="module")
def jax_model():
    from jaxinfer.models.checkpoint import load_model
    config, params, _ = load_model(MODEL_DIR, "float32")
    return config, params


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32,
                                                          attn_implementation="eager")
    return model.eval()


def _hf_nll_fn(model):
    import torch

    def nll(inputs, targets):
        with torch.no_grad():
            logits = model(torch.from_numpy(inputs).long()).logits.float()  # [B, C, V]
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp.gather(-1, torch.from_numpy(targets).long()[..., None])[..., 0]
        return (-picked).numpy()

    return nll


def test_logits_match_hf(jax_model, hf_model):
    import jax.numpy as jnp
    import torch

    from jaxinfer.models.transformer import AttentionMetadata, Transformer

    config, params = jax_model
    docs = stdlib_corpus.heldout_token_ids(MODEL_DIR, max_files=2, max_tokens=4 * 96)
    tokens = stdlib_corpus.make_windows(docs, 96).inputs[:4]  # [B, L] full windows
    batch, length = tokens.shape
    ours, _ = Transformer(config).apply({"params": params}, jnp.asarray(tokens.reshape(-1)),
                                        jnp.tile(jnp.arange(length, dtype=jnp.int32), batch), None,
                                        AttentionMetadata.dense(batch, length))
    ours = np.asarray(ours).reshape(batch, length, -1)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens).long()).logits.float().numpy()
    assert ours.shape == ref.shape == (batch, length, config.vocab_size)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=LOGIT_TOL * scale)
    # Both pick the same next token everywhere (a trained model has clear maxima).
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) > 0.99


def test_heldout_perplexity_matches_hf(jax_model, hf_model):
    config, params = jax_model
    docs = stdlib_corpus.heldout_token_ids(MODEL_DIR, max_files=2, max_tokens=512)
    windows = stdlib_corpus.make_windows(docs, 128)
    ours = stdlib_corpus.perplexity(stdlib_corpus.jaxinfer_nll_fn(config, params), windows, batch_size=4)
    ref = stdlib_corpus.perplexity(_hf_nll_fn(hf_model), windows, batch_size=4)
    assert ours["tokens"] == ref["tokens"] == 512
    np.testing.assert_allclose(ours["perplexity"], ref["perplexity"], rtol=PPL_RTOL)
    # A trained model: far better than guessing uniformly over the vocabulary.
    assert ours["perplexity"] < config.vocab_size / 20


def test_tokenizer_round_trips_heldout_files():
    split = stdlib_corpus.load_split(MODEL_DIR)
    tokenizer = stdlib_corpus.Tokenizer(MODEL_DIR)
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        config = json.load(f)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (config["bos_token_id"], config["eos_token_id"])
    assert not set(split.heldout) & set(split.train)
    texts = [stdlib_corpus.read_text(os.path.join(split.root, f)) for f in split.heldout[:6]]
    # Plus the whitespace a code tokenizer is most likely to mangle.
    texts.append("def f():\n\tif x:\r\n\t\treturn  1   \n\n\n        pass\n  \n# ünï ✓\n")
    for text, ids in zip(texts, tokenizer.encode(texts)):
        assert tokenizer.decode(ids) == text
