"""The `jaxinfer` command line (absl).

    jaxinfer generate --prompt "def fib(n):" [--model PATH|NAME] [--max_tokens N] [--temperature T]
    jaxinfer generate --prompt "def fib(n):" --quantization int4 [--quant_group_size 128]
    jaxinfer generate --prompt "def fib(n):" --tensor_parallel_size 4 [--expert_parallel_size 2]
    jaxinfer serve [--model PATH|NAME] [--host 127.0.0.1] [--port 8000] [--grpc_port 9000] [--api_key K]
    jaxinfer warmup [--model PATH|NAME] [--warmup grid|profile] [--warmup_context_tokens N] [engine flags]
    jaxinfer generate ... --tensor_parallel_size 16 --coordinator_address HOST0:PORT --num_processes 2 --process_id I

`generate` streams the completion to stdout, then prints a one-line summary: prompt
tokens, generated tokens, time to first token and decode tokens/s. `serve` starts the
OpenAI-compatible HTTP API and the gRPC services (jaxinfer/serving/server.py) and
prints their addresses once the warm-up is done; SIGTERM drains and exits 0. `warmup`
compiles the step programs a configuration needs (InferenceSession.warmup) into the
persistent compilation cache, so that a later `serve` or session with the same model
and engine flags starts warm; it prints the program count and seconds. Without
--model the bundled default model is used. Sampling flags left out take the model
folder's generation_config.json values; both commands take the engine flags.

Several processes (docs/multiprocess.md): the same command runs on every host with its
own --process_id; jax.distributed joins them (before jax touches a device) into one
engine over all their devices. Process 0 runs the engine and prints; the others follow
its steps silently and exit 0 when it is done. A failure there (e.g. a lost process)
prints one error line and exits 1 at once, without jax's exit barrier.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from jaxinfer.assets import DEFAULT_MODEL

_MODEL = flags.DEFINE_string("model", DEFAULT_MODEL, "Model folder (HF or converted) or a bundled name.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (generate).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens to generate at most (generate).")
# Sampling flags default to None: the model folder's generation_config.json decides.
_TEMPERATURE = flags.DEFINE_float("temperature", None,
                                  "Sampling temperature (0 = greedy; default: the model's generation_config).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k (0 = off; default: the model's generation_config).")
_TOP_P = flags.DEFINE_float("top_p", None, "Top-p in (0, 1] (default: the model's generation_config).")
_MIN_P = flags.DEFINE_float("min_p", None, "Min-p in [0, 1] (default: the model's generation_config).")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", None,
                                         "Repetition penalty > 0, 1 = off (default: the model's generation_config).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")

# Engine flags (generate and serve).
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter/activation dtype.")
_QUANTIZATION = flags.DEFINE_enum("quantization", None, ["int4", "int4-gptq"],
                                  "Quantize the linear layers to int4 at load: round to nearest (int4) or GPTQ "
                                  "calibrated on built-in Python stdlib text (int4-gptq).")
_QUANT_GROUP_SIZE = flags.DEFINE_integer("quant_group_size", 128,
                                         "Input rows per int4 scale; must divide every layer's input features.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_NUM_PAGES = flags.DEFINE_integer("num_pages", None, "KV pages in the pool (default: sized from 1 GiB).")
_MAX_NUM_BATCHED_TOKENS = flags.DEFINE_integer("max_num_batched_tokens", 512,
                                               "Token budget per engine step (decodes + prefill chunks).")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 64, "Running sequences at most.")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", None, "Prompt + output tokens at most (default: the "
                                      "model's context).")
_ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", None, ["xla", "pallas", "pallas_interpret",
                                                             "pallas_tpu_interpret"],
                                    "Attention implementation (default: the backend's).")
_KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8", "fp8"],
                                    "KV page storage: the model dtype (auto), or int8 / float8 e4m3 with a scale "
                                    "per token and KV head (about twice the pages in the same memory).")
_PREEMPTION_MODE = flags.DEFINE_enum("preemption_mode", "recompute", ["recompute", "swap", "auto"],
                                     "When pages run out, a preempted request's KV is recomputed later, or "
                                     "swapped to host memory and back, or whichever costs less (auto).")
_SWAP_SPACE_BYTES = flags.DEFINE_integer("swap_space_bytes", 1 << 30, "Host memory for swapped KV pages "
                                         "(--preemption_mode swap / auto); a request that does not fit is "
                                         "recomputed.")
_ENABLE_PREFIX_CACHING = flags.DEFINE_bool("enable_prefix_caching", True, "Share computed prompt pages.")
_DISAGGREGATION = flags.DEFINE_enum("disaggregation", None, ["splitwise"],
                                    "Splitwise: prompts on the first --prefill_tensor_parallel_size devices, decodes "
                                    "on the next --decode_tensor_parallel_size (default: colocated).")
_PREFILL_TP = flags.DEFINE_integer("prefill_tensor_parallel_size", 1, "Splitwise: devices of the prefill mesh.")
_DECODE_TP = flags.DEFINE_integer("decode_tensor_parallel_size", 1, "Splitwise: devices of the decode mesh.")
_SPECULATIVE_METHOD = flags.DEFINE_enum("speculative_method", None, ["ngram", "draft", "early_exit"],
                                        "Speculative decoding: prompt lookup (ngram), a draft model of the same "
                                        "tokenizer (draft, --draft_model), or a recursive model's first loops "
                                        "(early_exit, --draft_loops); default off. Outputs do not change.")
_NUM_SPECULATIVE_TOKENS = flags.DEFINE_integer("num_speculative_tokens", 4, "Draft tokens per decode step at most.")
_DRAFT_MODEL = flags.DEFINE_string("draft_model", None, "Draft model folder or bundled name (--speculative_method "
                                   "draft).")
_DRAFT_LOOPS = flags.DEFINE_integer("draft_loops", 1, "Loops of the recursive model that draft (--speculative_method "
                                    "early_exit).")
_DEPTHWISE = flags.DEFINE_enum("depthwise_batching", "auto", ["auto", "on", "off"],
                               "A recursive model: one call of the shared block per step over tokens at different "
                               "loops (auto = when its settings allow; off = loops back to back).")
_EARLY_EXIT_THRESHOLD = flags.DEFINE_float("early_exit_threshold", None, "Depth-wise: a decode token exits after "
                                           "the first loop whose max probability reaches this (default: never).")
_EARLY_EXIT_KV_FILL = flags.DEFINE_enum("early_exit_kv_fill", "compute", ["compute", "copy"],
                                        "K/V of the loops an exited token skips: run them, or copy the exit state.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Persistent XLA compilation cache folder (default: $JAXINFER_COMPILATION_CACHE_DIR, else "
    "~/.cache/jaxinfer/xla); an empty string turns it off.")
_TENSOR_PARALLEL_SIZE = flags.DEFINE_integer("tensor_parallel_size", 1, "Devices that split each layer's heads, "
                                            "MLP width and vocabulary (Megatron tensor parallelism).")
_EXPERT_PARALLEL_SIZE = flags.DEFINE_integer("expert_parallel_size", 1, "Devices that split the experts of "
                                            "mixture-of-experts layers.")
_PIPELINE_MICROBATCHES = flags.DEFINE_integer("pipeline_microbatches", None, "Pipeline: the most microbatches "
                                             "a step is cut into (default: the number of stages).")
_PIPELINE_PARALLEL_SIZE = flags.DEFINE_integer("pipeline_parallel_size", 1, "Pipeline stages (layers split "
                                              "over devices).")

# Several processes (generate and serve).
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process engine (jax.distributed); 'auto' "
    "lets jax detect it (TPU pods, SLURM). Every process runs the same command with its --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-process engine (default 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes); process 0 "
                                   "runs the engine and prints.")
_HEARTBEAT_TIMEOUT_S = flags.DEFINE_integer("heartbeat_timeout_s", 100, "Multi-process: seconds without a heartbeat "
                                            "after which a process counts as dead and jax ends the others.")

# Server flags (serve).
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (serve).")
_PORT = flags.DEFINE_integer("port", 8000, "HTTP port: the OpenAI-compatible API (serve).")
_GRPC_PORT = flags.DEFINE_integer("grpc_port", 9000, "gRPC port: JetStream's Orchestrator, jaxinfer.v1, health, "
                                  "reflection (serve); -1 = no gRPC.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on every endpoint but health "
                               "(serve; default: $JAXINFER_API_KEY if set).")
_MAX_QUEUED_REQUESTS = flags.DEFINE_integer("max_queued_requests", 256,
                                            "Waiting requests beyond the running slots; more are refused with "
                                            "429 / RESOURCE_EXHAUSTED (serve).")
_MAX_REQUEST_BODY_BYTES = flags.DEFINE_integer("max_request_body_bytes", 4 << 20,
                                               "Largest HTTP body / gRPC message (serve).")
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate chain: TLS on both ports (serve).")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key for --tls_cert (serve).")
_DRAIN_TIMEOUT_S = flags.DEFINE_float("drain_timeout_s", 30.0,
                                      "On SIGTERM / SIGINT: seconds in-flight requests may finish (serve).")
_MAX_GENERATED_TOKENS_PER_REQUEST = flags.DEFINE_integer(
    "max_generated_tokens_per_request", 1 << 16, "n x max_tokens of one request at most; more is refused with "
    "400 before any work (serve).")
_LOG_PROMPTS = flags.DEFINE_bool("log_prompts", False, "Write each request's prompt text in the log (serve; off "
                                 "by default: prompts may be private, and neither they nor API keys are logged).")
_SERVED_MODEL_NAME = flags.DEFINE_string("served_model_name", None,
                                         "Model id clients send (default: the --model value).")

_WARMUP = flags.DEFINE_enum(
    "warmup", None, ["grid", "profile", "none"],
    "Programs compiled before serving (serve; default profile) or by `jaxinfer warmup` (default grid): profile = "
    "those earlier processes of this model and engine flags compiled (recorded next to the compilation cache); "
    "grid = those plus every decode and prompt-chunk bucket up to --warmup_context_tokens; none = neither.")
_WARMUP_CONTEXT_TOKENS = flags.DEFINE_integer("warmup_context_tokens", None, "Longest context the warm-up grid "
                                              "covers (default: --max_model_len).")

_COMMANDS = ("generate", "serve", "warmup")


def _sampling_params(session):
    fields = {"max_tokens": _MAX_TOKENS.value, "seed": _SEED.value, "stop": tuple(_STOP.value)}
    for name, flag in (("temperature", _TEMPERATURE), ("top_k", _TOP_K), ("top_p", _TOP_P), ("min_p", _MIN_P),
                       ("repetition_penalty", _REPETITION_PENALTY)):
        if flag.value is not None:
            fields[name] = flag.value
    return session.default_sampling_params(**fields)


def _engine_config():
    from jaxinfer.config import EngineConfig, SpeculativeConfig
    speculative = None
    if _SPECULATIVE_METHOD.value is not None:
        speculative = SpeculativeConfig(method=_SPECULATIVE_METHOD.value, draft_model=_DRAFT_MODEL.value,
                                        num_speculative_tokens=_NUM_SPECULATIVE_TOKENS.value,
                                        draft_loops=_DRAFT_LOOPS.value)
    return EngineConfig(speculative=speculative, disaggregation=_DISAGGREGATION.value,
                        prefill_tensor_parallel_size=_PREFILL_TP.value, decode_tensor_parallel_size=_DECODE_TP.value,
                        page_size=_PAGE_SIZE.value, num_pages=_NUM_PAGES.value,
                        max_num_batched_tokens=_MAX_NUM_BATCHED_TOKENS.value, max_num_seqs=_MAX_NUM_SEQS.value,
                        max_model_len=_MAX_MODEL_LEN.value, attention_impl=_ATTENTION_IMPL.value,
                        enable_prefix_caching=_ENABLE_PREFIX_CACHING.value,
                        kv_cache_dtype=_KV_CACHE_DTYPE.value, preemption_mode=_PREEMPTION_MODE.value,
                        swap_space_bytes=_SWAP_SPACE_BYTES.value,
                        compilation_cache_dir=_COMPILATION_CACHE_DIR.value,
                        tensor_parallel_size=_TENSOR_PARALLEL_SIZE.value,
                        expert_parallel_size=_EXPERT_PARALLEL_SIZE.value,
                        pipeline_parallel_size=_PIPELINE_PARALLEL_SIZE.value,
                        pipeline_microbatches=_PIPELINE_MICROBATCHES.value,
                        depthwise_batching={"auto": None, "on": True, "off": False}[_DEPTHWISE.value],
                        early_exit_threshold=_EARLY_EXIT_THRESHOLD.value, early_exit_kv_fill=_EARLY_EXIT_KV_FILL.value)


_LOADED = []  # a session was built in this process (the job's processes exit together after that)


def _load_session():
    from jaxinfer.session import InferenceSession
    quant_config = None
    if _QUANTIZATION.value is not None:
        from jaxinfer.quant import QuantConfig
        quant_config = QuantConfig(group_size=_QUANT_GROUP_SIZE.value)
    session = InferenceSession.from_pretrained(_MODEL.value, dtype=_DTYPE.value, quantization=_QUANTIZATION.value,
                                               quantization_config=quant_config, engine=_engine_config())
    _LOADED.append(True)
    return session


def _start_processes() -> bool:
    """Joins the multi-process job when the flags ask for one; True in a follower process.

    jax.distributed must start before jax touches a device: nothing before this did.
    In a job, native prints (gloo's connection lines) go to stderr so that stdout holds
    the completion only, and a follower's Python stdout is dropped.
    """
    from jaxinfer.sharding import distributed
    if not distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  heartbeat_timeout_s=_HEARTBEAT_TIMEOUT_S.value):
        return False
    if not distributed.is_multiprocess():
        return False
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    leader = distributed.process_index() == 0
    sys.stdout = os.fdopen(real_stdout, "w", closefd=True) if leader else open(os.devnull, "w")
    return not leader


def _follow() -> int:
    """A follower process: builds the same session, runs process 0's steps until it is done."""
    session = _load_session()
    session.run_follower()
    return 0


def _leader_session():
    """Checks the engine flags (before the slow load), joins a multi-process job when the
    flags ask for one, and loads the session. Returns (session, load seconds) in the
    process that runs the engine; None in a follower, after it followed the steps."""
    _engine_config()
    if _start_processes():
        _follow()
        return None
    start = time.perf_counter()
    session = _load_session()
    return session, time.perf_counter() - start


def generate() -> int:
    if not _PROMPT.value:
        raise app.UsageError("--prompt is required and must not be empty")
    if _STOP.value and any(not s for s in _STOP.value):
        raise app.UsageError("stop: entries must be non-empty strings")
    loaded = _leader_session()
    if loaded is None:
        return 0
    session, load_seconds = loaded
    with session:
        try:
            params = _sampling_params(session)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        # Validated and queued before anything is printed: an error is not glued to the prompt.
        stream = session.stream(_PROMPT.value, params, output="deltas")
        sys.stdout.write(_PROMPT.value)
        for delta in stream:
            if delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        out = stream.output
        metrics = session.metrics()
    num_generated = out.num_generated_tokens
    ttft = out.time_to_first_token
    # Decode speed from the request's own timings, without the one-off compilations of
    # decode shapes (reported apart); independent of when text was released.
    decode_seconds = (num_generated - 1) * out.time_per_output_token - out.decode_compile_seconds
    rate = (num_generated - 1) / decode_seconds if num_generated > 1 and decode_seconds > 0 else 0.0
    rate_text = f"{rate:.1f} tokens/s" if num_generated > 1 else "n/a tokens/s (one token)"
    print()
    print(f"[jaxinfer] prompt tokens: {out.num_prompt_tokens} | generated tokens: {num_generated} "
          f"({out.finish_reason}) | time to first token: {ttft * 1000:.1f} ms | decode: {rate_text} "
          f"| load: {load_seconds:.2f} s | compiles: {metrics['num_compiles']} "
          f"({metrics['compile_seconds']:.2f} s, not in decode tokens/s) "
          f"| weights: {metrics['weight_bytes'] / 1e6:.2f} MB | KV cache: {metrics['kv_cache_bytes'] / 1e6:.2f} MB, "
          f"{metrics['num_total_pages']} pages ({_KV_CACHE_DTYPE.value})" + _mesh_summary(metrics)
          + (f" | speculation: {_SPECULATIVE_METHOD.value}, {metrics['spec_num_accepted_tokens']} of "
             f"{metrics['spec_num_draft_tokens']} draft tokens accepted" if _SPECULATIVE_METHOD.value else ""))
    return 0


def _mesh_summary(metrics) -> str:
    if metrics["num_devices"] == 1:
        return ""
    layout = " x ".join(f"{axis} {size}" for axis, size in metrics["mesh_shape"].items() if size > 1)
    return (f" | devices: {metrics['num_devices']} ({layout}), per device: weights "
            f"{metrics['weight_bytes_per_device'] / 1e6:.2f} MB, KV {metrics['kv_cache_bytes_per_device'] / 1e6:.2f} MB")


def serve() -> int:
    import logging
    import os

    from jaxinfer.serving.core import ServingConfig, ServingEngine
    from jaxinfer.serving.metrics import ServingMetrics
    from jaxinfer.serving.server import Listen, serve as run_servers
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("jaxinfer.serving")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    api_key = _API_KEY.value if _API_KEY.value is not None else os.environ.get("JAXINFER_API_KEY") or None
    config = ServingConfig(model_name=_SERVED_MODEL_NAME.value or _MODEL.value, api_key=api_key,
                           max_queued_requests=_MAX_QUEUED_REQUESTS.value,
                           max_request_body_bytes=_MAX_REQUEST_BODY_BYTES.value,
                           drain_timeout_s=_DRAIN_TIMEOUT_S.value,
                           max_generated_tokens_per_request=_MAX_GENERATED_TOKENS_PER_REQUEST.value,
                           log_prompts=_LOG_PROMPTS.value, warmup=_WARMUP.value or "profile",
                           warmup_context_tokens=_WARMUP_CONTEXT_TOKENS.value)
    listen = Listen(host=_HOST.value, port=_PORT.value, grpc_port=None if _GRPC_PORT.value < 0 else _GRPC_PORT.value,
                    tls_cert=_TLS_CERT.value, tls_key=_TLS_KEY.value)
    loaded = _leader_session()
    if loaded is None:
        return 0
    session, load_seconds = loaded
    logger.info("loaded %s in %.2f s (%.2f MB of weights)", _MODEL.value, load_seconds,
                session.metrics()["weight_bytes"] / 1e6)
    engine = ServingEngine(session, config, metrics=ServingMetrics(config.model_name, session.async_engine.metrics))

    def ready(runner) -> None:
        scheme = "https" if listen.tls_cert else "http"
        grpc_text = f" | gRPC {listen.host}:{runner.grpc_port}" if runner.grpc_port is not None else ""
        print(f"[jaxinfer] serving {config.model_name!r}: OpenAI API {scheme}://{listen.host}:{runner.http_port}/v1"
              f"{grpc_text} | warm-up {engine.warmup_seconds:.2f} s | ready", flush=True)

    return run_servers(engine, listen, on_ready=ready)


def warmup() -> int:
    mode = _WARMUP.value or "grid"
    if _WARMUP_CONTEXT_TOKENS.value is not None and _WARMUP_CONTEXT_TOKENS.value < 1:
        raise app.UsageError(f"--warmup_context_tokens: must be >= 1, got {_WARMUP_CONTEXT_TOKENS.value}")
    loaded = _leader_session()
    if loaded is None:
        return 0
    session, load_seconds = loaded
    with session:
        if session.compilation_cache_dir is None:
            print("[jaxinfer] note: --compilation_cache_dir is off: the programs last only as long as this process",
                  file=sys.stderr)
        report = session.warmup(profile=mode != "none", grid=mode == "grid",
                                context_tokens=_WARMUP_CONTEXT_TOKENS.value)
        profile = session.shape_profile.path if session.shape_profile is not None else "off"
    print(f"[jaxinfer] warm-up ({mode}): {report['programs']} programs ({report['compiled']} compiled or loaded, "
          f"{report['profile_programs']} from the profile) in {report['seconds']:.2f} s"
          + (f" ({report['flushes']} memory-map flushes: {report['held']} held at the end, the rest in the cache)"
             if report["flushes"] else "") + f" | load: {load_seconds:.2f} s "
          f"| compilation cache: {session.compilation_cache_dir or 'off'} | profile: {profile}")
    return 0


def main(argv):
    if len(argv) < 2 or argv[1] not in _COMMANDS:
        raise app.UsageError(f"usage: jaxinfer {{{'|'.join(_COMMANDS)}}} [flags]; got {argv[1:]}")
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {argv[2:]}")
    try:
        code = {"generate": generate, "serve": serve, "warmup": warmup}[argv[1]]()
    except (ValueError, FileNotFoundError) as e:
        if _COORDINATOR_ADDRESS.value is not None and not _LOADED:  # the others may wait for this process
            _leave_job(f"jaxinfer: error: {_job_name()}: {e}", 2)
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        code = 2
    except app.UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - in a job: report and leave without jax's exit barrier
        if _COORDINATOR_ADDRESS.value is None:
            raise
        _leave_job(f"jaxinfer: error: {_job_name()}: {type(e).__name__}: {e}", 1)
    sys.stdout.flush()
    return code


def _job_name() -> str:
    from jaxinfer.sharding import distributed
    if distributed.is_initialized():
        import jax
        return f"process {jax.process_index()} of {jax.process_count()}"
    return f"process {_PROCESS_ID.value} of {_NUM_PROCESSES.value}"


def _leave_job(message: str, code: int) -> None:
    """Prints `message`, then ends the process now: jax's exit barrier would wait for the
    lost process (up to its shutdown timeout) and then abort."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _adopt_flags_for_help() -> None:
    """Makes this module's flags key flags of the running program, so `--help` lists them.

    absl's --help shows the key flags of the main module, which it names by sys.argv[0]:
    for the `jaxinfer` console script (or `python -m jaxinfer.cli`) that is not this module.
    """
    for flag in flags.FLAGS.get_key_flags_for_module(__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run():
    """Console-script entry point."""
    _adopt_flags_for_help()
    app.run(main)


if __name__ == "__main__":
    run()
