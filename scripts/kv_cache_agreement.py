"""Greedy agreement of a quantized KV cache (int8, fp8) with the float cache.

    python scripts/kv_cache_agreement.py --model tiny-code --num_prompts 32 --prompt_len 64 --max_tokens 32

Held-out prompts (the first --prompt_len tokens of the model folder's held-out files,
scripts/stdlib_corpus.py) are generated greedily by three engines that differ only in
EngineConfig.kv_cache_dtype ("auto", "int8", "fp8"). Printed per format: requests whose
tokens are identical to the float cache's, tokens before each request's first
divergence, and the pool's pages and bytes.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_MODEL = flags.DEFINE_string("model", "tiny-code", "Model folder or bundled model name.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 32, "Held-out prompts.", lower_bound=1)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.", lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Greedy tokens per prompt.", lower_bound=1)


def main(argv):
    del argv
    from stdlib_corpus import heldout_token_ids

    from jaxinfer import EngineConfig, InferenceSession, SamplingParams
    from jaxinfer.assets import resolve_model_path

    path = _MODEL.value if os.path.isdir(_MODEL.value) else resolve_model_path(_MODEL.value)
    docs = [d for d in heldout_token_ids(path, None, None) if len(d) > _PROMPT_LEN.value]
    prompts = [d[:_PROMPT_LEN.value] for d in docs[:_NUM_PROMPTS.value]]
    params = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=0.0, ignore_eos=True)
    outputs = {}
    for fmt in ("auto", "int8", "fp8"):
        session = InferenceSession.from_pretrained(path, engine=EngineConfig(kv_cache_dtype=fmt))
        outputs[fmt] = [o.token_ids for o in session.generate(prompts, params)]
        m = session.metrics()
        print(f"{fmt:>4}: {m['num_total_pages']} pages, kv_cache_bytes {m['kv_cache_bytes']:,}")
        session.close()
    total = sum(map(len, outputs["auto"]))
    for fmt in ("int8", "fp8"):
        same = sum(a == b for a, b in zip(outputs["auto"], outputs[fmt]))
        before = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                     for a, b in zip(outputs["auto"], outputs[fmt]))
        print(f"{fmt:>4}: {same}/{len(prompts)} requests identical to the float cache, "
              f"{before}/{total} tokens before the first divergence")


if __name__ == "__main__":
    app.run(main)
