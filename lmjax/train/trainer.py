"""The training loop: plain typed arguments, no gin (lmjax/configs.py binds the configs)."""

import dataclasses
import functools
import math
import os
import time

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from lmjax.data.pipelines import classification_eval_batches
from lmjax.errors import RunError
from lmjax.parallel import pipeline
from lmjax.parallel.distributed import loading_for
from lmjax.parallel.mesh import batch_parallelism, batch_sharding, stacked_sharding, to_global
from lmjax.train import optim, prune
from lmjax.train.checkpoint import Checkpointer, as_abstract, best_params
from lmjax.train.config import TrainConfig
from lmjax.train.metrics import MetricWriter, NullWriter
from lmjax.train.state import TrainState, abstract_params, create_state, state_shardings
from lmjax.train.step import train_step
from lmjax.train.tasks import ClassifyTask, Task, evaluate


class NonFiniteLossError(RunError, FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Setup:
    """What a run needs besides its state: the task, compiled functions and shardings."""

    task: Task
    tx: object
    abstract: TrainState  # ShapeDtypeStructs with shardings
    step_fn: object  # (state, batch) -> (state, metrics)
    steps_fn: object  # (state, batches stacked on a leading axis) -> (state, metrics stacked)
    eval_fn: object  # (params, batch, carry) -> (sums, carry)
    batch_sharding: NamedSharding


def make_optimizer(config: TrainConfig):
    """(optax transformation, schedule) of `config` (optimiser from optim.OPTIMIZERS)."""
    schedule = optim.SCHEDULES[config.lr_decay](config.learning_rate, config.min_lr,
                                                config.warmup_steps,
                                                config.decay_steps or config.num_steps)
    tx = optim.OPTIMIZERS.get(config.optimizer)(
        schedule, beta1=config.beta1, beta2=config.beta2, weight_decay=config.weight_decay,
        grad_clip=config.grad_clip)
    if config.prune is not None and config.prune.enabled:
        tx = optax.chain(tx, prune.magnitude_pruning(config.prune, config.num_steps))
    return tx, schedule


def make_eval_fn(task: Task, param_shardings, data_sharding: NamedSharding,
                 pipeline_microbatches: int = 1):
    """jit(task.eval_sums) with the parameters and the batch placed on the mesh; a
    pipelined model splits the batch into `pipeline_microbatches`."""

    def eval_sums(params, batch, carry):
        with pipeline.microbatches(pipeline_microbatches):
            return task.eval_sums(params, batch, carry)

    return jax.jit(eval_sums, in_shardings=(param_shardings, data_sharding, data_sharding))


def build(task: Task, config: TrainConfig, mesh: Mesh, rules) -> Setup:
    """The compiled train, multi-step and eval functions of `task` on `mesh`."""
    tx, schedule = make_optimizer(config)
    abstract, shardings = state_shardings(task, tx, config.batch_size, mesh, rules)
    data_sharding = batch_sharding(mesh)  # a prefix: every batch leaf splits its rows
    step = functools.partial(train_step, task=task, tx=tx, schedule=schedule,
                             num_micro=config.microbatches,
                             pipeline_microbatches=config.pipeline_microbatches)
    step_fn = jax.jit(step, in_shardings=(shardings, data_sharding),
                      out_shardings=(shardings, None), donate_argnums=0)
    steps_fn = jax.jit(functools.partial(jax.lax.scan, step),
                       in_shardings=(shardings, stacked_sharding(data_sharding)),
                       out_shardings=(shardings, None), donate_argnums=0)
    eval_fn = make_eval_fn(task, shardings.params, data_sharding, config.pipeline_microbatches)
    return Setup(task, tx, as_abstract(abstract, shardings), step_fn, steps_fn, eval_fn,
                 data_sharding)


def initial_state(setup: Setup, config: TrainConfig, mesh: Mesh, rules) -> TrainState:
    """A fresh run's state: created sharded, then the task's warm start (fine-tuning)."""
    state = create_state(setup.task, setup.tx, config.batch_size, config.seed, mesh, rules)
    # Optimiser moments start at zero whatever the params, so replacing them is exact.
    return state.replace(params=setup.task.warm_start(state.params))


def stack_batches(batches: list[dict]) -> dict:
    """Consecutive batches -> one with a leading axis of steps (`Setup.steps_fn`'s input)."""
    return jax.tree.map(lambda *rows: np.stack(rows), *batches)


def eval_set(task: Task, config: TrainConfig, sharding: NamedSharding | None = None
             ) -> list[dict]:
    """The fixed eval batches of a run, the same at every evaluation; with `sharding`,
    this process's rows of them (those its devices hold)."""
    with loading_for(sharding):
        return task.eval_batches(config.eval_rows, config.eval_batches, config.seed + 1)


def writer_for(workdir: str, start: int | None):
    """Process 0 writes metrics.jsonl and TensorBoard; the others write nothing."""
    return MetricWriter(workdir, start) if jax.process_index() == 0 else NullWriter()


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


@dataclasses.dataclass
class _Run:
    """One training run's moving parts, passed through the loop together."""

    setup: Setup
    config: TrainConfig
    checkpoints: Checkpointer
    writer: MetricWriter
    data_iter: object
    evals: list[dict]


def _restore_or_init(setup: Setup, checkpoints: Checkpointer, config: TrainConfig, mesh, rules,
                     data_iter):
    """(state, meta, step restored from or None): the newest checkpoint that reads back
    whole (damaged newer ones are skipped, saying why), else a fresh state."""
    found = checkpoints.restore_latest(setup.abstract, data_iter)
    if found is None:
        state = initial_state(setup, config, mesh, rules)
        return state, {"best_eval_loss": None, "best_step": None}, None
    return found


def train(*, task: Task, config: TrainConfig, mesh: Mesh, rules, workdir: str,
          on_ready=None) -> dict:
    """Trains (or resumes from `workdir`) and returns a summary of the final metrics.

    `on_ready` runs (in process 0 of a multi-process job) once the checkpoint has been
    checked against the model and before anything is written, so callers can record the
    config without overwriting a workdir that belongs to another model. Every process
    loads its rows of each batch, saves its shards of each checkpoint and computes the
    same metrics; process 0 alone writes the metrics and shows progress.
    """
    config.validate(batch_parallelism(mesh), pipeline.stage_count(mesh))
    setup = build(task, config, mesh, rules)
    with loading_for(setup.batch_sharding):
        data_iter = task.train_iterator(config.batch_size, config.seed)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state, meta, start = _restore_or_init(setup, checkpoints, config, mesh, rules,
                                                  data_iter)
        if on_ready is not None and jax.process_index() == 0:
            on_ready()
        run = _Run(setup, config, checkpoints, writer_for(workdir, start), data_iter,
                   eval_set(task, config, setup.batch_sharding))
        try:
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return _loop(run, state, meta, start or 0)
        finally:
            checkpoints.wait()
            run.writer.close()
    finally:
        checkpoints.close()


def _eval_record(run: _Run, state, meta, step, final: bool = False) -> tuple[dict, dict]:
    """Evaluates, updates the best-so-far record and writes the eval line."""
    setup = run.setup
    metrics = evaluate(setup.task, setup.eval_fn, state.params, run.evals, run.config.eval_rows,
                       setup.batch_sharding)
    if run.config.prune is not None and run.config.prune.enabled:
        metrics["sparsity"] = prune.kernel_sparsity(state.params)
    metrics.update(setup.task.extra_eval(state.params, step, final))
    loss = metrics["loss"]
    if meta["best_eval_loss"] is None or loss < meta["best_eval_loss"]:
        meta = {**meta, "best_eval_loss": loss, "best_step": step}
    run.writer.write({"step": step, "split": "eval", **metrics,
                      "best_loss": meta["best_eval_loss"]})
    return metrics, meta


def _loop(run: _Run, state, meta, start: int) -> dict:
    config, setup = run.config, run.setup
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
        state, metrics = advance(setup, state, run.data_iter, count)
        if pending:
            # At most two calls in flight. With two CPU devices, queueing ~300 steps
            # deadlocked in XLA's all-reduce rendezvous (one device's part never arrived,
            # async dispatch on or off); one queued call still keeps the devices busy.
            jax.block_until_ready(pending[-1][1]["loss"])
        pending.append((step + 1, metrics))
        step += count
        final = step == config.num_steps or _out_of_time(config, run_start)
        if step % config.log_every == 0 or final:
            record = _log_train(pending, step, last, items_per_step, run.writer,
                                setup.task.throughput_key)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            pending = []
        eval_loss = None
        do_eval = step % config.eval_every == 0 or final
        do_save = step % config.checkpoint_every == 0 or final
        if do_eval or do_save:
            _check_finite(pending)  # never evaluate or save a state that produced NaN
        if do_eval:
            eval_metrics, meta = _eval_record(run, state, meta, step, final)
            eval_loss = eval_metrics["loss"]
        if do_save:
            run.checkpoints.save(step, state, run.data_iter, meta, eval_loss)
        bar.update(count)
        if final:
            break
    bar.close()
    return _summary(config, start, meta, record, eval_loss, eval_metrics,
                    time.perf_counter() - run_start, step)


def _out_of_time(config: TrainConfig, run_start: float) -> bool:
    """Whether this process has trained for `train.max_minutes` (never when unset). All
    processes of a job must agree, so a multi-process job takes process 0's clock."""
    if config.max_minutes is None:
        return False
    over = time.perf_counter() - run_start >= 60 * config.max_minutes
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        over = bool(multihost_utils.broadcast_one_to_all(np.asarray(over)))
    return over


def _summary(config, start, meta, record, eval_loss, eval_metrics, elapsed,
             step=None) -> dict:
    """The run's final figures, also printed as one line."""
    summary = {
        "step": config.num_steps if step is None else step,
        "train_loss": record.get("loss"),
        "eval_loss": eval_loss,
        "best_eval_loss": meta["best_eval_loss"],
        "best_step": meta["best_step"],
        "seconds": elapsed,
        "eval": eval_metrics,
    }
    if jax.process_index() != 0:
        return summary  # process 0 speaks for the job
    if start == config.num_steps:
        print(f"{config.num_steps} steps already done in this workdir; nothing to train")
    else:
        print(
            f"done: step {summary['step']}, train loss {summary['train_loss']:.4f}, eval loss "
            f"{eval_loss:.4f}{_format_extra(eval_metrics)} (best {meta['best_eval_loss']:.4f} "
            f"at step {meta['best_step']}), {elapsed:.1f} s"
        )
    return summary


def _format_extra(metrics: dict) -> str:
    """', accuracy 0.8200, f1 0.8300' for the metrics besides loss (classification,
    translation)."""
    shown = [k for k in ("accuracy", "f1", "mlm_accuracy", "nsp_accuracy", "bleu", "chrf")
             if k in metrics]
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


def evaluate_best(*, task: Task, config: TrainConfig, mesh: Mesh, rules, workdir: str) -> dict:
    """Re-evaluates the best checkpoint's parameters on the eval batches training used."""
    abstract = abstract_params(task, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, step = best_params(workdir, abstract)
        eval_fn = make_eval_fn(task, jax.tree.map(lambda x: x.sharding, abstract),
                               batch_sharding(mesh), config.pipeline_microbatches)
        evals = eval_set(task, config, batch_sharding(mesh))
        metrics = evaluate(task, eval_fn, params, evals, config.eval_rows, batch_sharding(mesh))
    print(f"eval: step {step}, loss {metrics['loss']:.4f}{_format_extra(metrics)} over "
          f"{len(evals)} batches")
    return {"step": step, "split": "eval", **metrics}


def train_logits(*, task: Task, config: TrainConfig, mesh: Mesh, rules, workdir: str,
                 texts: list[str] | None = None) -> np.ndarray:
    """The best checkpoint's logits on every training example, in the split's stored order,
    or on each of `texts` encoded as the training split is (what distillation reads;
    lmjax/train/distill.py). One process."""
    if not isinstance(task, ClassifyTask) or jax.process_count() > 1:
        raise ValueError("--train_logits needs a classification run (train.task = 'classify' "
                         "or 'bert_finetune') in one process")
    if texts is not None and task.data.encode is None:
        raise ValueError("--texts needs a run whose data encodes raw text (classify_dataset "
                         "or bert_finetune)")
    examples = task.data.train if texts is None else task.data.encode(texts)
    abstract = abstract_params(task, mesh, rules)
    rows = config.eval_rows
    batches = classification_eval_batches(examples, rows, len(examples))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, step = best_params(workdir, abstract)
        logits_fn = jax.jit(task.logits, in_shardings=(
            jax.tree.map(lambda x: x.sharding, abstract), batch_sharding(mesh)))
        out = [np.asarray(logits_fn(params, batch))
               for batch in tqdm(batches, desc="train logits", unit="batch")]
    print(f"train logits: step {step}, {len(examples)} examples")
    return np.concatenate(out)[: len(examples)]
