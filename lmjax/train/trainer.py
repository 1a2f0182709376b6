"""The training loop: plain typed arguments, no gin (see lmjax/entry.py for the edges)."""

import dataclasses
import functools
import math
import os
import time

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from lmjax.data.pipelines import LMData
from lmjax.models import GPT, GPTConfig
from lmjax.parallel.mesh import batch_parallelism, batch_sharding
from lmjax.train import optim
from lmjax.train.checkpoint import Checkpointer, as_abstract
from lmjax.train.metrics import MetricWriter
from lmjax.train.state import TrainState, create_task_state, task_state_shardings
from lmjax.train.step import task_eval_step, task_train_step
from lmjax.train.tasks import LMTask, Task, add_sums


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 5000
    batch_size: int = 64  # global, over all devices and processes
    learning_rate: float = 1e-3  # peak
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # defaults to num_steps
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    microbatches: int = 1
    # Optimiser steps per compiled call: a lax.scan over that many batches pays the
    # call's fixed host cost (dispatch, placing the batch, the wait) once for all of them.
    steps_per_call: int = 1
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 200
    eval_batch_size: int | None = None  # defaults to batch_size
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    seed: int = 1337
    optimizer: str = "adamw"  # a name in optim.OPTIMIZERS

    def validate(self, parallelism: int) -> None:
        positive = ("num_steps", "batch_size", "microbatches", "steps_per_call", "log_every",
                    "eval_every", "checkpoint_every", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        per_micro = self.batch_size // self.microbatches
        if self.batch_size % self.microbatches:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by microbatches={self.microbatches}"
            )
        if per_micro % parallelism:
            raise ValueError(
                f"microbatch of {per_micro} rows does not divide over data*fsdp={parallelism} "
                "devices; change train.batch_size, train.microbatches or the mesh"
            )


@dataclasses.dataclass
class Setup:
    """What a run needs besides its state: compiled functions, shardings, checkpoints."""

    model: nn.Module
    tx: object
    abstract: TrainState  # ShapeDtypeStructs with shardings
    step_fn: object  # (state, batch) -> (state, metrics)
    steps_fn: object  # (state, batches stacked on a leading axis) -> (state, metrics stacked)
    eval_fn: object
    batch_sharding: NamedSharding
    checkpoints: Checkpointer
    task: Task | None = None


def gpt_task(model_config: GPTConfig, data: LMData | None = None) -> LMTask:
    """The GPT language-model task (data is only needed for its input pipelines)."""
    return LMTask(GPT(model_config), data, model_config.block_size)


def build(model_config: GPTConfig, config: TrainConfig, mesh: Mesh, rules, workdir: str,
          read_only: bool = False, task: Task | None = None) -> Setup:
    """Compiled step and eval functions of `task` (default: the GPT LM of model_config)."""
    task = task or gpt_task(model_config)
    schedule = optim.warmup_cosine(
        config.learning_rate, config.min_lr, config.warmup_steps,
        config.decay_steps or config.num_steps,
    )
    tx = optim.OPTIMIZERS.get(config.optimizer)(
        schedule, beta1=config.beta1, beta2=config.beta2, weight_decay=config.weight_decay,
        grad_clip=config.grad_clip)
    abstract, shardings = task_state_shardings(task, tx, config.batch_size, mesh, rules)
    data_sharding = batch_sharding(mesh)  # a prefix: every batch leaf splits its rows
    step = functools.partial(task_train_step, task=task, tx=tx, schedule=schedule,
                             num_micro=config.microbatches)
    step_fn = jax.jit(step, in_shardings=(shardings, data_sharding),
                      out_shardings=(shardings, None), donate_argnums=0)
    steps_fn = jax.jit(functools.partial(jax.lax.scan, step),
                       in_shardings=(shardings, stacked_sharding(data_sharding)),
                       out_shardings=(shardings, None), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(task_eval_step, task=task),
                      in_shardings=(shardings.params, data_sharding, data_sharding))
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                               read_only=read_only)
    return Setup(task.model, tx, as_abstract(abstract, shardings), step_fn, steps_fn, eval_fn,
                 data_sharding, checkpoints, task)


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows -> one global array per key, sharded over data and fsdp.

    In one process the rows are the whole batch, and the NumPy arrays go to the jitted
    step as they are: its `in_shardings` place them while it dispatches, about 0.45 ms a
    step sooner at char-rnn's size than `jax.device_put` first (bench_rnn.py's step)."""
    if jax.process_count() == 1:
        return batch
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def stacked_sharding(sharding: NamedSharding) -> NamedSharding:
    """`sharding` of batches for arrays with a leading axis of steps before the rows."""
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


def stack_batches(batches: list[dict]) -> dict:
    """Consecutive batches -> one with a leading axis of steps (`Setup.steps_fn`'s input)."""
    return jax.tree.map(lambda *rows: np.stack(rows), *batches)


def evaluate_metrics(setup: Setup, params, batches: list[dict], batch_size: int) -> dict:
    """The task's eval metrics over `batches` (sums added on the host in float64)."""
    task = setup.task
    carry = jax.device_put(task.eval_carry(batch_size), setup.batch_sharding)
    pending, total = [], None
    for batch in batches:
        sums, carry = setup.eval_fn(params, to_global(batch, setup.batch_sharding), carry)
        pending.append(sums)
        if len(pending) > 1:  # at most two in flight, as in the training loop
            jax.block_until_ready(pending[-2])
    for sums in jax.device_get(pending):
        total = add_sums(total, sums)
    return task.finish_eval(total)


def evaluate(setup: Setup, params, batches: list[dict], batch_size: int | None = None) -> float:
    """Eval loss over `batches`."""
    size = batch_size or len(next(iter(batches[0].values())))
    return evaluate_metrics(setup, params, batches, size)["loss"]


def _eval_batch_size(config: TrainConfig) -> int:
    return config.eval_batch_size or config.batch_size


def eval_set(task: Task, config: TrainConfig) -> list[dict]:
    return task.eval_batches(_eval_batch_size(config), config.eval_batches, config.seed + 1)


def _check_finite(pending: list[tuple[int, dict]]) -> list[dict]:
    """Fetches the pending calls' metrics in one transfer and stops at the first NaN/Inf.
    pending: (first step, its metrics: scalars, or stacked over the call's steps) per call.
    Returns the metrics of each step."""
    fetched = jax.device_get([metrics for _, metrics in pending])
    steps = []  # every metric is one scalar per step: a call's are (steps,) arrays
    for (first, _), metrics in zip(pending, fetched, strict=True):
        flat = {k: np.reshape(v, -1) for k, v in metrics.items()}
        steps += [(first + i, {k: v[i] for k, v in flat.items()})
                  for i in range(flat["loss"].size)]
    for step, metrics in steps:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"loss {loss} (gradient norm {grad_norm}) at step {step}; training stopped "
                "and the last good checkpoint is kept. Lower train.learning_rate or check "
                "the data."
            )
    return [metrics for _, metrics in steps]


def _restore_or_init(setup: Setup, config: TrainConfig, mesh, rules, data_iter):
    latest = setup.checkpoints.latest_step()
    if latest is None:
        state = create_task_state(setup.task, setup.tx, config.batch_size, config.seed, mesh,
                                  rules)
        # Optimiser moments start at zero whatever the params, so replacing them is exact.
        state = state.replace(params=setup.task.warm_start(state.params, mesh, rules))
        return state, {"best_eval_loss": None, "best_step": None}, None
    state, meta = setup.checkpoints.restore(latest, setup.abstract, data_iter)
    return state, meta, latest


def train(
    *,
    workdir: str,
    model_config: GPTConfig,
    data: LMData,
    config: TrainConfig,
    mesh: Mesh,
    rules,
    on_ready=None,
    task: Task | None = None,
) -> dict:
    """Trains (or resumes from `workdir`) and returns a summary of the final metrics.

    `task` defaults to the GPT language model of `model_config` on `data`. `on_ready`
    runs once the checkpoint has been checked against the model and before anything is
    written, so callers can record the config without overwriting a workdir that
    belongs to another model.
    """
    config.validate(batch_parallelism(mesh))
    task = task or gpt_task(model_config, data)
    setup = build(model_config, config, mesh, rules, workdir, task=task)
    data_iter = task.train_iterator(config.batch_size, config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, meta, start = _restore_or_init(setup, config, mesh, rules, data_iter)
    if on_ready is not None:
        on_ready()
    evals = eval_set(task, config)
    writer = MetricWriter(workdir, start)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            summary = _loop(setup, state, meta, start or 0, config, data_iter, evals, writer)
    finally:
        setup.checkpoints.wait()
        setup.checkpoints.close()
        writer.close()
    return summary


def _eval_record(setup, state, meta, step, config, evals, writer) -> tuple[dict, dict]:
    """Evaluates, updates the best-so-far record and writes the eval line."""
    metrics = evaluate_metrics(setup, state.params, evals, _eval_batch_size(config))
    loss = metrics["loss"]
    if meta["best_eval_loss"] is None or loss < meta["best_eval_loss"]:
        meta = {**meta, "best_eval_loss": loss, "best_step": step}
    writer.write({"step": step, "split": "eval", **metrics, "best_loss": meta["best_eval_loss"]})
    return metrics, meta


def _loop(setup, state, meta, start, config, data_iter, evals, writer) -> dict:
    items_per_step = setup.task.items_per_step(config.batch_size)
    pending: list[tuple[int, dict]] = []
    last = {"time": time.perf_counter(), "step": start}
    record, eval_loss, eval_metrics = {}, None, {}
    bar = tqdm(total=config.num_steps, initial=start, desc="train", unit="step",
               disable=jax.process_index() != 0)
    run_start = time.perf_counter()
    step = start
    while step < config.num_steps:
        count = _call_steps(step, config)
        state, metrics = advance(setup, state, data_iter, count)
        if pending:
            # At most two calls in flight. With two CPU devices, queueing ~300 steps
            # deadlocked in XLA's all-reduce rendezvous (one device's part never arrived,
            # async dispatch on or off); one queued call still keeps the devices busy.
            jax.block_until_ready(pending[-1][1]["loss"])
        pending.append((step + 1, metrics))
        step += count
        final = step == config.num_steps
        if step % config.log_every == 0 or final:
            record = _log_train(pending, step, last, items_per_step, writer,
                                setup.task.throughput_key)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            pending = []
        eval_loss = None
        do_eval = step % config.eval_every == 0 or final
        do_save = step % config.checkpoint_every == 0 or final
        if do_eval or do_save:
            _check_finite(pending)  # never evaluate or save a state that produced NaN
        if do_eval:
            eval_metrics, meta = _eval_record(setup, state, meta, step, config, evals, writer)
            eval_loss = eval_metrics["loss"]
        if do_save:
            setup.checkpoints.save(step, state, data_iter, meta, eval_loss)
        bar.update(count)
    bar.close()
    elapsed = time.perf_counter() - run_start
    summary = {
        "step": config.num_steps,
        "train_loss": record.get("loss"),
        "eval_loss": eval_loss,
        "best_eval_loss": meta["best_eval_loss"],
        "best_step": meta["best_step"],
        "seconds": elapsed,
        "eval": eval_metrics,
    }
    if start == config.num_steps:
        print(f"{config.num_steps} steps already done in this workdir; nothing to train")
    else:
        extra = _format_extra(eval_metrics)
        print(
            f"done: step {summary['step']}, train loss {summary['train_loss']:.4f}, eval loss "
            f"{eval_loss:.4f}{extra} (best {meta['best_eval_loss']:.4f} at step "
            f"{meta['best_step']}), {elapsed:.1f} s"
        )
    return summary


def _format_extra(metrics: dict) -> str:
    """', accuracy 0.8200, f1 0.8300' for the metrics besides loss (classification)."""
    shown = [k for k in ("accuracy", "f1", "mlm_accuracy", "nsp_accuracy") if k in metrics]
    return "".join(f", {k} {metrics[k]:.4f}" for k in shown)


def _call_steps(step: int, config: TrainConfig) -> int:
    """How many steps the call after `step` runs: steps_per_call, cut short at the next
    log, eval or checkpoint step and at the end, so that each still comes on its step.
    (Each new count compiles once: keep those intervals multiples of steps_per_call.)"""
    count = min(config.steps_per_call, config.num_steps - step)
    for every in (config.log_every, config.eval_every, config.checkpoint_every):
        count = min(count, every - step % every)
    return count


def advance(setup: Setup, state, data_iter, count: int):
    """`count` optimiser steps on the next `count` batches of `data_iter` in one compiled
    call (`step_fn`, or `steps_fn` over them stacked): (state, metrics), the metrics
    stacked over the steps when count > 1."""
    if count == 1:
        return setup.step_fn(state, to_global(next(data_iter), setup.batch_sharding))
    batches = stack_batches([next(data_iter) for _ in range(count)])
    return setup.steps_fn(state, to_global(batches, stacked_sharding(setup.batch_sharding)))


def _log_train(pending, step, last, items_per_step, writer,
               throughput_key="tokens_per_sec") -> dict:
    metrics = _check_finite(pending)[-1]  # one fetch for the interval; waits for its last step
    now = time.perf_counter()
    items_per_sec = (step - last["step"]) * items_per_step / (now - last["time"])
    last.update(time=now, step=step)
    record = {
        "step": step,
        "split": "train",
        "loss": float(metrics["loss"]),
        "learning_rate": float(metrics["learning_rate"]),
        "grad_norm": float(metrics["grad_norm"]),
        throughput_key: items_per_sec,
    }
    for key in sorted(set(metrics) - {"loss", "learning_rate", "grad_norm"}):
        record[key] = float(metrics[key])  # the task's own train metrics (e.g. accuracy)
    writer.write(record)
    return record


def restore_best(workdir: str, model_config: GPTConfig, config: TrainConfig, mesh: Mesh, rules,
                 task: Task | None = None):
    """(setup, state, step) of the best checkpoint in workdir (the latest if none has an eval)."""
    setup = build(model_config, config, mesh, rules, workdir, read_only=True, task=task)
    step = setup.checkpoints.best_step() or setup.checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train first with "
            f"`python -m lmjax.main train --workdir={workdir} --gin_file=...`"
        )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, _ = setup.checkpoints.restore(step, setup.abstract)
    return setup, state, step


def evaluate_best(*, workdir: str, model_config: GPTConfig, data: LMData, config: TrainConfig,
                  mesh: Mesh, rules, on_ready=None, task: Task | None = None) -> dict:
    """Re-evaluates the best checkpoint on the eval batches training used."""
    del on_ready
    task = task or gpt_task(model_config, data)
    setup, state, step = restore_best(workdir, model_config, config, mesh, rules, task)
    evals = eval_set(task, config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        metrics = evaluate_metrics(setup, state.params, evals, _eval_batch_size(config))
    setup.checkpoints.close()
    print(f"eval: step {step}, loss {metrics['loss']:.4f}{_format_extra(metrics)} over "
          f"{len(evals)} batches")
    return {"step": step, "split": "eval", **metrics}
