"""The training loop shared by scripts/train_tiny.py and scripts/uptrain_recursive.py.

- `sample_batch`: random windows of a token stream, a function of (seed, step) only, so
  a resumed run sees the batches the killed one would have.
- `make_optimizer` / `lr_schedule`: AdamW (b1 0.9, b2 0.95, decay on matrices only) behind
  global-norm clipping, at learning rate 1; the step scales the update by the scheduled
  rate (warmup + cosine decay), so the schedule's length can be fitted after the run has
  started. AdamW's update is linear in the rate, so this is plain AdamW.
- `define_flags`: the absl flags of the loop, the optimizer and the held-out scoring, each
  script passing its own defaults.
- `run_loop`: the resumable loop. Orbax checkpoints of {"params", "opt_state"} plus a JSON
  meta every `checkpoint_minutes` and at the end; a JSONL row per step (loss, lr, grad
  norm, tokens/s and whatever the step reports); a tqdm progress bar; with max_steps 0
  the step count is fitted to the wall-clock budget from the measured speed (re-fitted
  at every checkpoint: another process may share the CPU), and the budget also stops
  the loop cleanly if the machine gets slower later.
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from typing import Callable

from absl import flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm


def define_flags(*, max_minutes: float, learning_rate: float, warmup_steps: int, weight_decay: float,
                 eval_max_tokens: int) -> types.SimpleNamespace:
    """Defines the flags both training scripts take; returns their FlagHolders by name."""
    return types.SimpleNamespace(
        max_minutes=flags.DEFINE_float("max_minutes", max_minutes,
                                       "Wall-clock budget of the training loop (all sessions)."),
        max_steps=flags.DEFINE_integer("max_steps", 0, "Training steps; 0 = fit to --max_minutes from measured speed."),
        calibration_steps=flags.DEFINE_integer("calibration_steps", 12,
                                               "Steps timed (after compilation) to fit the step count."),
        checkpoint_minutes=flags.DEFINE_float("checkpoint_minutes", 5.0, "Minutes between orbax checkpoints."),
        max_train_files=flags.DEFINE_integer("max_train_files", 0, "Use only the first N training files (0 = all)."),
        seq_len=flags.DEFINE_integer("seq_len", 256, "Training window length (tokens)."),
        batch_size=flags.DEFINE_integer("batch_size", 16, "Windows per step."),
        learning_rate=flags.DEFINE_float("learning_rate", learning_rate, "Peak learning rate."),
        min_lr_ratio=flags.DEFINE_float("min_lr_ratio", 0.1, "Final learning rate / peak."),
        warmup_steps=flags.DEFINE_integer("warmup_steps", warmup_steps, "Linear warmup steps."),
        weight_decay=flags.DEFINE_float("weight_decay", weight_decay, "AdamW decoupled weight decay (matrices only)."),
        grad_clip=flags.DEFINE_float("grad_clip", 1.0, "Global gradient norm clip."),
        seed=flags.DEFINE_integer("seed", 0, "Seed of the data order (and of a new model's init)."),
        eval_max_tokens=flags.DEFINE_integer("eval_max_tokens", eval_max_tokens,
                                             "Held-out tokens scored (0 = skip)."),
        eval_batch_size=flags.DEFINE_integer("eval_batch_size", 8, "Windows per held-out scoring call."),
    )


def sample_batch(stream: np.ndarray, data_key: jax.Array, step: int, batch: int, length: int) -> np.ndarray:
    """[batch, length + 1] random windows of the stream; a function of (seed, step) only."""
    starts = np.asarray(jax.random.randint(jax.random.fold_in(data_key, step), (batch,), 0,
                                           stream.size - length - 1))
    return np.stack([stream[s:s + length + 1] for s in starts]).astype(np.int32)


def make_optimizer(grad_clip: float, weight_decay: float) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(learning_rate=1.0, b1=0.9, b2=0.95, eps=1e-8,
                                   weight_decay=weight_decay, mask=decay_mask))


def lr_schedule(peak: float, min_lr_ratio: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * min_lr_ratio)


def make_step(loss_fn: Callable, tx: optax.GradientTransformation):
    """Jitted (state, windows, lr) -> (state, metrics) for loss_fn(params, windows) ->
    (loss, {name: scalar}); metrics holds loss, grad_norm and loss_fn's own scalars."""

    # NOTE: no buffer donation: an async orbax save may still be reading the previous state.
    @jax.jit
    def train_step(state, windows, lr):
        (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], windows)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        updates = jax.tree.map(lambda u: lr * u, updates)
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {"loss": loss, "grad_norm": optax.global_norm(grads),
                                                            **extra}

    return train_step


def trim_log(path: str, max_step: int) -> None:
    """Drops log rows after the restored checkpoint (they are about to be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= max_step]
    with open(path, "w") as f:
        f.writelines(rows)


def run_loop(*, fresh_state: Callable[[], dict], train_step, stream: np.ndarray, data_key: jax.Array,
             work_dir: str, batch_size: int, seq_len: int, schedule_for: Callable[[int], optax.Schedule],
             warmup_steps: int, max_minutes: float, max_steps: int = 0, calibration_steps: int = 12,
             checkpoint_minutes: float = 5.0, desc: str = "train") -> tuple[dict, dict]:
    """Runs (or resumes) the loop in work_dir (checkpoints/, train_log.jsonl). Returns (params, meta).

    Args:
      fresh_state: () -> {"params", "opt_state"} of a new run (also the restore target's shape).
      train_step: from `make_step`.
      schedule_for: total steps -> the learning-rate schedule.
      max_steps: the step count; 0 = fitted to max_minutes from the measured speed.
    """
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(work_dir, "checkpoints")),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    log_path = os.path.join(work_dir, "train_log.jsonl")
    meta = {"step": 0, "total_steps": max_steps or None, "tokens": 0, "elapsed_s": 0.0}
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.eval_shape(fresh_state)
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], dict(restored["meta"])
        if max_steps:
            meta["total_steps"] = max_steps
        trim_log(log_path, meta["step"])
        logging.info("resumed from step %d (%d tokens, %.1f min of training so far)", meta["step"],
                     meta["tokens"], meta["elapsed_s"] / 60)
    else:
        state = fresh_state()
        trim_log(log_path, 0)  # rows of a run killed before its first checkpoint
    tokens_per_step = batch_size * seq_len
    budget_s = max_minutes * 60
    session_start, elapsed_before = time.time(), meta["elapsed_s"]
    elapsed = lambda: elapsed_before + time.time() - session_start  # noqa: E731
    last_save = time.time()
    # max_steps 0: the step count is fitted to the budget, first after calibration_steps,
    # then at every checkpoint; fit_since = (time, step) of the last fit.
    auto_steps = not max_steps
    fit_since = None
    step = start_step = meta["step"]
    schedule = schedule_for(meta["total_steps"] or warmup_steps + 1)

    def save(step):
        meta.update(step=step, elapsed_s=elapsed())
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(dict(meta))), force=True)

    bar = tqdm(total=meta["total_steps"], initial=step, desc=desc, unit="step", mininterval=5,
               smoothing=0.1, file=sys.stderr)
    recent = []  # (time, tokens) of the last steps, for the tokens/s shown
    loss_ema = None
    stopped_by_budget = False
    with open(log_path, "a") as log:
        while meta["total_steps"] is None or step < meta["total_steps"]:
            if elapsed() >= budget_s:
                # NOTE: only when the machine got slower than the last fit predicted.
                stopped_by_budget = True
                break
            lr = float(schedule(step))
            windows = sample_batch(stream, data_key, step, batch_size, seq_len)
            state, metrics = train_step(state, jnp.asarray(windows), jnp.float32(lr))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            loss = metrics["loss"]
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            step += 1
            meta["tokens"] += tokens_per_step
            now = time.time()
            recent = (recent + [(now, meta["tokens"])])[-20:]
            tok_s = (recent[-1][1] - recent[0][1]) / max(1e-9, recent[-1][0] - recent[0][0]) if len(recent) > 1 else 0.0
            loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
            row = {"step": step, "tokens": meta["tokens"], "lr": lr, "elapsed_s": round(elapsed(), 2),
                   "tokens_per_s": round(tok_s, 1), **{k: round(v, 5) for k, v in metrics.items()}}
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}", refresh=False)

            if auto_steps and fit_since is None and step == start_step + 2:  # compiled by now
                fit_since = (now, step)
            elif auto_steps and fit_since and (
                    (meta["total_steps"] is None and step == fit_since[1] + calibration_steps)
                    or now - last_save >= checkpoint_minutes * 60):
                seconds_per_step = (now - fit_since[0]) / (step - fit_since[1])
                remaining = budget_s - elapsed()
                meta["total_steps"] = max(step + int(0.97 * remaining / seconds_per_step), warmup_steps + 1, step + 1)
                meta["seconds_per_step"] = seconds_per_step
                schedule = schedule_for(meta["total_steps"])
                bar.total = meta["total_steps"]
                fit_since = (now, step)
                logging.info("fit: %.2f s/step (%.0f tokens/s) -> %d steps in the %.1f min budget", seconds_per_step,
                             tokens_per_step / seconds_per_step, meta["total_steps"], budget_s / 60)
            if now - last_save >= checkpoint_minutes * 60:
                save(step)
                last_save = now
    bar.close()
    meta["stopped_by_budget"] = stopped_by_budget
    if stopped_by_budget:
        logging.warning("wall-clock budget of %.1f min reached at step %d of %s; stopping", budget_s / 60, step,
                        meta["total_steps"])
    if meta["total_steps"] is None:  # the budget ran out before calibration finished
        meta["total_steps"] = step
    if manager.latest_step() != step:
        save(step)
    meta.update(step=step, elapsed_s=elapsed())
    manager.wait_until_finished()
    manager.close()
    return state["params"], meta


def read_log(work_dir: str) -> list[dict]:
    """The rows of work_dir/train_log.jsonl."""
    with open(os.path.join(work_dir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class DropOrbaxInfo:
    """absl log filter: orbax logs a dozen INFO lines per checkpoint; keep its warnings."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in record.pathname


def check_run_config(work_dir: str, config: dict) -> None:
    """Saves config as work_dir/run_config.json, or checks a resumed run has the same one."""
    path = os.path.join(work_dir, "run_config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != config:
            diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
            raise ValueError(f"{work_dir} holds a run with other settings {diff} (saved, now); "
                             f"pass a new --work_dir or the same settings")
    else:
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


__all__ = ["DropOrbaxInfo", "check_run_config", "define_flags", "lr_schedule", "make_optimizer", "make_step",
           "read_log", "run_loop", "sample_batch", "trim_log"]
