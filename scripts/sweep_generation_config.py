"""Sweep of default sampling parameters for a code model, measured on its held-out files.

A model folder's generation_config.json sets the sampling defaults that `jaxinfer
generate`, the servers and `InferenceSession.default_sampling_params()` use when a
request leaves them out. For the bundled 6M-parameter `tiny-code` greedy decoding falls
into a loop ("Return a list of the list of the list..."), so the defaults must sample;
this script picks them by measurement instead of by taste.

Prompts. From the held-out files of the folder's data_split.json (never trained on):
every single-line `def ...:` / `class ...:` header (found with `ast`, so each is real
code), one per file in turn (files shuffled with --seed) until --num_prompts. Half of
the prompts are the header alone, dedented, like `jaxinfer generate --prompt "def
fibonacci(n):"`; the other half carry the --context_lines lines before it in the file.
Every prompt ends at the header's colon, as the CLI prompt does.

Metric, per completion (the functions below; tests/scripts/test_sweep_generation_config.py
tests them):
  syntax_ok   the header plus the completion, cut after its last complete line (a
              completion stopped by max_tokens ends mid-line), is a valid *prefix* of a
              Python program: `codeop.compile_command(..., symbol="exec")` returns a code
              object (complete) or None (incomplete: an open docstring, bracket or
              block), not a SyntaxError. The header is put back inside its enclosing
              blocks (one `if 1:` per enclosing indentation level, read from the file's
              ast), so a completion that ends the method and goes on at class level is
              judged at the right indentation; the earlier context lines are not part
              of the check (they start mid-block). A completion with no complete
              non-blank line is not ok. Plain `ast.parse` would reject every completion
              that max_tokens cut inside a docstring or call; `tokenize` alone would
              accept prose ("Return a list of the list") as NAME tokens.
  repetition  1 - distinct 3-grams / 3-grams of the completion's lexemes (identifiers,
              numbers, single punctuation characters): the loop failure mode. Text, not
              model token ids, so it does not depend on the tokenizer.
  score       syntax_ok * (1 - repetition), averaged over the completions: the share of
              completions that are Python, discounted by how much they repeat
              themselves. Neither term alone is a target: greedy loops inside a valid
              docstring (syntax 1, repetition high); high temperatures repeat nothing
              but stop being Python.
Reported but not scored: the fraction of repeated (non-blank) lines, and the mean log p
per generated token under the model (raw distribution): greedy wins likelihood by
construction, so it says how far a candidate strays, not how good it is. The same
metric on the files' own continuations (cut to the same token count) is printed as a
reference row.

Grid. temperature x repetition_penalty first, truncation filters off; temperature 0 is
greedy, where top_p / top_k / min_p do nothing, so it varies the penalty only. Then the
truncation filters (top_p x top_k x min_p, every combination) at the best sampled
(temperature, repetition_penalty) and at one temperature step hotter: the filters cut
the low-probability tail, which is what hurts at higher temperatures. repetition_penalty
is swept only when this checkout's SamplingParams has the field. Every candidate runs
the same prompts with the same per-prompt seeds (common random numbers), as one batch.
The full cross product (about 400 candidates) would take hours on two CPU cores, where
the sampler's full-vocabulary sort dominates a step.

Usage:
  python scripts/sweep_generation_config.py --output_json runs/sweep/generation_config.json
  python scripts/sweep_generation_config.py --write   # also updates the model's generation_config.json
  python scripts/sweep_generation_config.py --num_prompts 8 --temperatures 0,0.8 --top_ps 1.0 --top_ks 0 \
      --min_ps 0 --repetition_penalties 1.0   # a quick smoke run
"""
from __future__ import annotations

import ast
import codeop
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
import warnings
from typing import Optional, Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stdlib_corpus import load_split, read_text  # noqa: E402

_MODEL = flags.DEFINE_string("model", "tiny-code",
                             "Model folder, or the name of a bundled model under jaxinfer/assets/.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 40, "Prompts (one completion each per candidate).",
                                    lower_bound=1)
_CONTEXT_LINES = flags.DEFINE_integer("context_lines", 6, "Lines before the header in the prompts that carry "
                                      "context (half of them; the other half are the header alone).", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Chooses the prompts and the per-prompt sampling seeds.", lower_bound=0)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens generated per completion at most.", lower_bound=1)
_TEMPERATURES = flags.DEFINE_list("temperatures", ["0", "0.2", "0.4", "0.6", "0.8", "1.0"],
                                  "Temperatures (0 = greedy).")
_REPETITION_PENALTIES = flags.DEFINE_list("repetition_penalties", ["1.0", "1.1", "1.2", "1.3"],
                                          "Repetition penalties (1 = off); ignored when SamplingParams has no "
                                          "repetition_penalty.")
_TOP_PS = flags.DEFINE_list("top_ps", ["0.9", "0.95", "1.0"], "Top-p values of the filter stage.")
_TOP_KS = flags.DEFINE_list("top_ks", ["0", "40"], "Top-k values of the filter stage (0 = off).")
_MIN_PS = flags.DEFINE_list("min_ps", ["0", "0.05", "0.1"], "Min-p values of the filter stage.")
_REFINE_STEPS = flags.DEFINE_integer("refine_steps", 1, "Filter stage temperatures: the best sampled one and "
                                     "this many steps hotter in --temperatures.", lower_bound=0)
_OUTPUT_JSON = flags.DEFINE_string("output_json", "runs/sweep/generation_config_sweep.json",
                                   "Every row, the prompts and the winner's completions as JSON.")
_WRITE = flags.DEFINE_bool("write", False, "Write the winner into the model folder's generation_config.json and "
                           "the sweep's provenance into its sampling_sweep.json.")
_TOP = flags.DEFINE_integer("top", 15, "Rows of the printed table.", lower_bound=1)
_DISABLE_TQDM = flags.DEFINE_bool("disable_tqdm", False, "No progress bar.")

FILTER_KEYS = ("top_p", "top_k", "min_p")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
NGRAM = 3
_LEXEME = re.compile(r"[A-Za-z_]\w*|\d+|\S")


# ------------------------------------------------------------------------------ metric

def complete_part(completion: str, finished: bool) -> str:
    """The completion up to and including its last newline; all of it when `finished`.

    A completion cut by max_tokens ends mid-line; one that ended with EOS is whole (a
    newline is added if it lacks one).
    """
    if finished:
        return completion if completion.endswith("\n") or not completion else completion + "\n"
    return completion[:completion.rfind("\n") + 1]


def wrap_header(header: str, enclosing: Sequence[int] = ()) -> str:
    """`header` inside one `if 1:` per enclosing indentation level (ascending columns)."""
    return "".join(" " * col + "if 1:\n" for col in enclosing) + header


def syntax_ok(header: str, completion: str, finished: bool = False, enclosing: Sequence[int] = ()) -> bool:
    """Whether header + completion (complete lines only) is a valid prefix of a Python program.

    Args:
      header: the `def ...:` / `class ...:` line the completion follows, indented as in
        the prompt, without a newline.
      completion: the generated text (starts with the newline after the colon).
      finished: the model ended it (EOS) rather than max_tokens, so its last line is whole.
      enclosing: the columns of the blocks that enclose the header (ascending).
    """
    body = complete_part(completion, finished)
    if not any(line.strip() for line in body.split("\n")):
        return False
    source = wrap_header(header, enclosing) + body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes in generated strings, ...
        try:
            codeop.compile_command(source, "<completion>", "exec")
        except SyntaxError as e:
            # A last line that ends in a backslash continuation is incomplete, not wrong.
            return "unexpected EOF" in str(e)
        except (ValueError, OverflowError, MemoryError, RecursionError):
            return False
    return True


def lexemes(text: str) -> list:
    return _LEXEME.findall(text)


def repetition(completion: str, n: int = NGRAM) -> float:
    """1 - distinct n-grams / n-grams of the lexemes; 0 when there are fewer than n lexemes."""
    words = lexemes(completion)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repeated_lines(completion: str) -> float:
    """Fraction of the non-blank lines (stripped) that repeat an earlier line; 0 without lines."""
    lines = [line.strip() for line in completion.split("\n") if line.strip()]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def score_completion(header: str, completion: str, finished: bool = False, enclosing: Sequence[int] = ()) -> dict:
    """The per-completion figures: syntax_ok (0/1), repetition, repeated_lines, score."""
    ok = syntax_ok(header, completion, finished, enclosing)
    rep = repetition(completion)
    return {"syntax_ok": float(ok), "repetition": rep, "repeated_lines": repeated_lines(completion),
            "score": float(ok) * (1.0 - rep)}


def summarize(scores: Sequence[dict], logps: Optional[Sequence[float]] = None) -> dict:
    """Means over the completions (and the standard error of the score)."""
    n = len(scores)
    out = {k: sum(s[k] for s in scores) / n for k in ("score", "syntax_ok", "repetition", "repeated_lines")}
    var = sum((s["score"] - out["score"]) ** 2 for s in scores) / max(n - 1, 1)
    out["score_se"] = math.sqrt(var / n)
    out["mean_logp"] = (sum(logps) / len(logps)) if logps else None
    return out


# ----------------------------------------------------------------------------- prompts

@dataclasses.dataclass(frozen=True)
class Prompt:
    file: str  # relative path in the held-out list
    line: int  # 1-based line of the header
    text: str  # what the model is given: context lines + header, ending at the colon
    header: str  # the header line as it stands in `text`
    enclosing: tuple  # columns of the enclosing blocks (empty for a dedented, bare header)
    reference: str  # the file's own continuation after the header (relative to `header`)


def _headers(tree: ast.AST, lines: Sequence[str]) -> list:
    """(lineno, enclosing columns) of every single-line def / class header."""
    found = []

    def visit(node, enclosing):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.stmt):
                continue
            inner = enclosing
            if hasattr(child, "body") and isinstance(child.body, list):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    line = lines[child.lineno - 1]
                    if (child.body[0].lineno > child.lineno and line.rstrip().endswith(":")
                            and "\t" not in line and len(line) < 100):
                        found.append((child.lineno, enclosing))
                inner = enclosing + (child.col_offset,)
            visit(child, inner)

    visit(tree, ())
    return found


def _continuation(lines: Sequence[str], lineno: int, indent: int, dedent: bool, limit: int = 40) -> str:
    """The lines after the header (at most `limit`), "\\n"-prefixed; dedented by `indent`
    when `dedent`, where a line less indented than the header ends it."""
    out = []
    for line in lines[lineno:lineno + limit]:
        if dedent and line.strip():
            if len(line) - len(line.lstrip(" ")) < indent:
                break
            line = line[indent:]
        out.append(line)
    return "\n" + "\n".join(out)


def build_prompts(model_dir: str, num_prompts: int, context_lines: int, seed: int) -> list:
    """Prompts from the held-out files: one header per file in turn, files shuffled by `seed`.

    Headers alternate between bare (dedented header alone) and in context (the
    `context_lines` lines before it, original indentation).
    """
    split = load_split(model_dir)
    rng = random.Random(seed)
    per_file = []
    for rel in split.heldout:
        text = read_text(os.path.join(split.root, rel))
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:  # e.g. lib2to3 test data in Python 2
            continue
        lines = text.split("\n")
        headers = _headers(tree, lines)
        if headers:
            rng.shuffle(headers)
            per_file.append((rel, lines, headers))
    if not per_file:
        raise ValueError(f"{model_dir}: no def / class headers in the held-out files")
    rng.shuffle(per_file)
    prompts, depth = [], 0
    while len(prompts) < num_prompts:
        added = False
        for rel, lines, headers in per_file:
            if depth >= len(headers) or len(prompts) == num_prompts:
                continue
            lineno, enclosing = headers[depth]
            line = lines[lineno - 1].rstrip()
            indent = len(line) - len(line.lstrip(" "))
            bare = len(prompts) % 2 == 0 or context_lines == 0
            if bare:
                header, enc = line[indent:], ()
                text = header
            else:
                header, enc = line, enclosing
                text = "\n".join(lines[max(0, lineno - 1 - context_lines):lineno - 1] + [line])
            prompts.append(Prompt(file=rel, line=lineno, text=text, header=header, enclosing=tuple(enc),
                                  reference=_continuation(lines, lineno, indent, bare)))
            added = True
        if not added:
            break  # fewer headers than num_prompts in all
        depth += 1
    return prompts


# -------------------------------------------------------------------------------- grid

def _floats(values):
    return [float(v) for v in values]


def stage1_grid(temperatures, repetition_penalties) -> list:
    """temperature x repetition_penalty with the filters off (a dict per candidate)."""
    return [{"temperature": t, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": rp}
            for t in temperatures for rp in repetition_penalties]


def stage2_grid(best: dict, temperatures, top_ps, top_ks, min_ps, steps: int, done: Sequence[dict]) -> list:
    """Every filter combination at the best sampled temperature and `steps` hotter ones."""
    sampled = sorted(t for t in temperatures if t > 0)
    at = sampled.index(best["temperature"])
    seen = {_key(c) for c in done}
    grid = []
    for t in sampled[at:at + 1 + steps]:
        for p in top_ps:
            for k in top_ks:
                for m in min_ps:
                    c = {"temperature": t, "top_p": p, "top_k": k, "min_p": m,
                         "repetition_penalty": best["repetition_penalty"]}
                    if _key(c) not in seen:
                        seen.add(_key(c))
                        grid.append(c)
    return grid


def _key(candidate: dict) -> tuple:
    return tuple(candidate[k] for k in SAMPLING_KEYS)


def label(c: dict) -> str:
    if c["temperature"] == 0:
        return f"greedy rp={c['repetition_penalty']:g}"
    return (f"T={c['temperature']:g} top_p={c['top_p']:g} top_k={c['top_k']} min_p={c['min_p']:g} "
            f"rp={c['repetition_penalty']:g}")


def rank_key(row: dict):
    return (-row["score"], -row["syntax_ok"], row["repetition"])


# ------------------------------------------------------------------------------- sweep

def has_repetition_penalty() -> bool:
    from jaxinfer import SamplingParams
    return "repetition_penalty" in SamplingParams.__dataclass_fields__


def sampling_params(c: dict, max_tokens: int, seed: int):
    from jaxinfer import SamplingParams
    fields = {k: c[k] for k in SAMPLING_KEYS if k != "repetition_penalty" or has_repetition_penalty()}
    return SamplingParams(max_tokens=max_tokens, seed=seed, logprobs=True, **fields)


def prompt_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def run_candidate(session, prompts: Sequence[Prompt], c: dict, max_tokens: int, seed: int) -> dict:
    """Generates one completion per prompt with candidate `c`; the row of figures."""
    params = [sampling_params(c, max_tokens, prompt_seed(seed, i)) for i in range(len(prompts))]
    start = time.perf_counter()
    outs = session.generate([p.text for p in prompts], params)
    seconds = time.perf_counter() - start
    scores, logps = [], []
    for p, out in zip(prompts, outs):
        scores.append(score_completion(p.header, out.text, out.finish_reason == "stop", p.enclosing))
        if out.logprobs:
            logps.append(sum(out.logprobs) / len(out.logprobs))
    row = {**c, "label": label(c), **summarize(scores, logps), "seconds": seconds,
           "generated_tokens": sum(len(o.token_ids) for o in outs)}
    row["_completions"] = [o.text for o in outs]
    return row


def reference_row(session, prompts: Sequence[Prompt], max_tokens: int) -> dict:
    """The metric on the files' own continuations, cut to `max_tokens` tokens."""
    scores = []
    for p in prompts:
        ids = session.tokenizer.encode(p.reference, add_special_tokens=False)
        cut = len(ids) > max_tokens
        text = session.tokenizer.decode(ids[:max_tokens]) if cut else p.reference
        scores.append(score_completion(p.header, text, not cut, p.enclosing))
    return {"label": "reference: the files' own continuations", **summarize(scores)}


def generation_config_update(config: dict, c: dict, with_repetition_penalty: bool) -> dict:
    """`config` (generation_config.json) with the winner's sampling keys; other keys kept."""
    out = {k: v for k, v in config.items() if k not in SAMPLING_KEYS and k != "do_sample"}
    if c["temperature"] > 0:
        out["do_sample"] = True
        out.update({k: c[k] for k in ("temperature", "top_k", "top_p", "min_p")})
    else:
        out["do_sample"] = False
        out["temperature"] = 0.0
    if with_repetition_penalty:
        out["repetition_penalty"] = c["repetition_penalty"]
    return out


def format_table(rows: Sequence[dict], reference: Optional[dict] = None) -> str:
    head = f"{'rank':>4}  {'candidate':<52} {'score':>12} {'syntax':>6} {'repet.':>6} {'rep.lines':>9} {'logp':>7}"
    lines = [head, "-" * len(head)]

    def fmt(rank, r):
        logp = "" if r.get("mean_logp") is None else f"{r['mean_logp']:7.3f}"
        return (f"{rank:>4}  {r['label']:<52} {r['score']:.3f}±{r['score_se']:.3f} {r['syntax_ok']:6.3f} "
                f"{r['repetition']:6.3f} {r['repeated_lines']:9.3f} {logp:>7}")

    lines += [fmt(i + 1, r) for i, r in enumerate(rows)]
    if reference is not None:
        lines.append(fmt("ref", reference))
    return "\n".join(lines)


def _command() -> str:
    return " ".join(["python scripts/sweep_generation_config.py"] + sys.argv[1:])


def main(argv):
    del argv
    import jax
    from tqdm import tqdm

    from jaxinfer import EngineConfig, InferenceSession
    from jaxinfer.assets import resolve_model_path

    wall_start, cpu_start = time.perf_counter(), time.process_time()
    model_dir = resolve_model_path(_MODEL.value)
    if not os.path.isdir(model_dir):
        raise app.UsageError(f"--model {_MODEL.value!r}: no such folder, and no bundled model of that name")
    with_rp = has_repetition_penalty()
    temperatures = _floats(_TEMPERATURES.value)
    penalties = _floats(_REPETITION_PENALTIES.value) if with_rp else [1.0]
    if not with_rp:
        print("SamplingParams has no repetition_penalty: it is left out of the grid", file=sys.stderr)
    prompts = build_prompts(model_dir, _NUM_PROMPTS.value, _CONTEXT_LINES.value, _SEED.value)
    n = len(prompts)
    engine = EngineConfig(max_num_seqs=max(n, 1), max_num_batched_tokens=1024)
    session = InferenceSession.from_pretrained(model_dir, engine=engine)
    reference = reference_row(session, prompts, _MAX_TOKENS.value)

    rows = []
    stage1 = stage1_grid(temperatures, penalties)  # greedy ignores the filters: stage 1 is all it needs
    with tqdm(total=len(stage1), desc="sweep", unit="cand", disable=_DISABLE_TQDM.value) as bar:
        for c in stage1:
            rows.append(run_candidate(session, prompts, c, _MAX_TOKENS.value, _SEED.value))
            bar.set_postfix_str(f"{rows[-1]['label']}: {rows[-1]['score']:.3f}")
            bar.update()
        sampled = sorted((r for r in rows if r["temperature"] > 0), key=rank_key)
        stage2 = []
        if sampled:
            best = sampled[0]
            stage2 = stage2_grid(best, temperatures, _floats(_TOP_PS.value), [int(k) for k in _TOP_KS.value],
                                 _floats(_MIN_PS.value), _REFINE_STEPS.value, stage1)
            bar.total += len(stage2)
            bar.refresh()
        for c in stage2:
            rows.append(run_candidate(session, prompts, c, _MAX_TOKENS.value, _SEED.value))
            bar.set_postfix_str(f"{rows[-1]['label']}: {rows[-1]['score']:.3f}")
            bar.update()
    session.close()
    wall_seconds = time.perf_counter() - wall_start
    cpu_seconds = time.process_time() - cpu_start  # all threads: wall time on a shared machine is not the cost

    ranked = sorted(rows, key=rank_key)
    winner = ranked[0]
    print(format_table(ranked[:_TOP.value], reference))
    print(f"\n{len(rows)} candidates x {n} prompts x <= {_MAX_TOKENS.value} tokens in {wall_seconds:.0f} s "
          f"({cpu_seconds:.0f} CPU-s, {jax.devices()[0].device_kind}); winner: {winner['label']}")
    for i in range(min(3, n)):
        print(f"\n--- {prompts[i].file}:{prompts[i].line} ---\n{prompts[i].text}{winner['_completions'][i]}")

    metric = ("per completion: syntax_ok (header + completion, cut after its last complete line, is a valid "
              "prefix of a Python program: codeop.compile_command(symbol='exec') does not raise; the header "
              "inside its enclosing blocks) x (1 - repetition), repetition = 1 - distinct 3-grams / 3-grams of "
              "the completion's lexemes; score = mean over the completions")
    grid = {"temperature": temperatures, "repetition_penalty": penalties if with_rp else None,
            "top_p": _floats(_TOP_PS.value), "top_k": [int(k) for k in _TOP_KS.value],
            "min_p": _floats(_MIN_PS.value),
            "design": f"stage 1: temperature x repetition_penalty, filters off; stage 2: top_p x top_k x min_p "
                      f"at the best sampled stage-1 (temperature, repetition_penalty) and {_REFINE_STEPS.value} "
                      f"temperature step(s) hotter"}
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in ranked]
    result = {"command": _command(), "model": os.path.abspath(model_dir), "metric": metric, "grid": grid,
              "repetition_penalty_swept": with_rp,
              "prompts": {"num": n, "seed": _SEED.value, "context_lines": _CONTEXT_LINES.value,
                          "max_tokens": _MAX_TOKENS.value, "files": sorted({p.file for p in prompts}),
                          "headers": [f"{p.file}:{p.line}" for p in prompts]},
              "reference": reference, "winner": public[0], "rows": public,
              "winner_completions": [{"prompt": p.text, "completion": t}
                                     for p, t in zip(prompts, winner["_completions"])],
              "wall_seconds": wall_seconds, "cpu_seconds": cpu_seconds,
              "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs"}
    if _OUTPUT_JSON.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value)), exist_ok=True)
        with open(_OUTPUT_JSON.value, "w") as f:
            json.dump(result, f, indent=2)
    if _WRITE.value:
        path = os.path.join(model_dir, "generation_config.json")
        config = {}
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f)
        config = generation_config_update(config, winner, with_rp)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        provenance = {k: result[k] for k in ("command", "metric", "grid", "repetition_penalty_swept", "prompts",
                                             "reference", "wall_seconds", "cpu_seconds",
                                             "device")}
        provenance["prompts"] = {k: v for k, v in provenance["prompts"].items() if k != "headers"}
        provenance["chosen"] = {k: config[k] for k in SAMPLING_KEYS if k in config}
        provenance["top"] = public[:10]
        with open(os.path.join(model_dir, "sampling_sweep.json"), "w") as f:
            json.dump(provenance, f, indent=2)
            f.write("\n")
        print(f"\nwrote {path}: {json.dumps(provenance['chosen'])}")


if __name__ == "__main__":
    app.run(main)
