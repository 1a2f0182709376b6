"""Runs a parameter-server job on the chosen transport, after checking the config."""

import dataclasses
import json
import os
import shutil

from lmjax.ps import config as ps_config
from lmjax.ps import sparse
from lmjax.ps.codecs import CODECS
from lmjax.ps.inproc import DELAYS, run_inproc
from lmjax.ps.policies import POLICIES
from lmjax.ps.server import LR_SCALINGS
from lmjax.ps.worker import task_shapes
from lmjax.registry import Registry
from lmjax.train.optim import OPTIMIZERS
from lmjax.train.registry import TASKS
from lmjax.train.tasks import LMTask, Task

TRANSPORTS: Registry = Registry("transport")


@TRANSPORTS.register("inproc")
def _inproc(*, workdir: str, config: ps_config.PSConfig, task: Task, data_config) -> dict:
    del data_config
    result = run_inproc(workdir=workdir, config=config, data=task.data)
    train = [r for r in result.records if r["split"] == "train"]
    summary = {"updates": len(train), "loss": train[-1]["loss"] if train else None,
               "virtual_time": train[-1]["time"] if train else 0.0}
    print(f"ps inproc: {summary['updates']} updates, last loss {summary['loss']:.4f}, "
          f"virtual time {summary['virtual_time']:.1f}")
    return summary


@TRANSPORTS.register("jax_distributed")
def _jax_distributed(*, workdir: str, config: ps_config.PSConfig, task: Task,
                     data_config) -> dict:
    del task  # every role process builds its own
    from lmjax.ps.launch import check_port, supervise
    from lmjax.ps.roles import RunSpec

    port = check_port(config.port)
    spec = RunSpec.create(os.path.abspath(workdir), config, data_config, f"127.0.0.1:{port}")
    path = os.path.join(spec.workdir, "ps_spec.json")
    spec.save(path)
    summary = supervise(spec, path)
    print(f"ps jax_distributed: {summary['updates']} updates in {summary['seconds']:.1f} s")
    return summary


def _require_model(config: ps_config.PSConfig) -> None:
    if config.model is None:
        raise ValueError("ps.model is not set; bind a model config, for example "
                         "ps.model = @GPTConfig() (see configs/ps/)")


def ps_tasks() -> list[str]:
    """The tasks of lmjax/train/registry.py a parameter server can run (built from data
    loaded once)."""
    return [name for name in TASKS.names() if TASKS.get(name).from_data is not None]


def check(config: ps_config.PSConfig, task: Task | None = None) -> None:
    """Every contradiction in the config is an error here, before any process starts;
    `task` gives the parameters (default: ps.model as a language model)."""
    _require_model(config)
    known = {"transport": TRANSPORTS.names(), "policy": POLICIES.names(),
             "optimizer": OPTIMIZERS.names(), "lr_scaling": LR_SCALINGS.names(),
             "delay": DELAYS.names(), "compression": CODECS.names(), "task": ps_tasks()}
    task = task or LMTask(config.model)
    ps_config.validate(config, len(task_shapes(task)), known)
    sparse.tables_of(config)  # raises for a model without sparse tables


def _earlier_run(workdir: str) -> list[str]:
    """What an earlier run left in `workdir`: metrics, summary, logs, shard checkpoints."""
    if not os.path.isdir(workdir):
        return []
    return sorted(name for name in os.listdir(workdir)
                  if name in ("logs", "metrics.jsonl", "summary.json", "tensorboard")
                  or name.startswith("server"))


def _start_over(workdir: str, overwrite: bool) -> None:
    """A run starts from scratch: shard checkpoints only serve restarts within a run,
    because the gradients they wait for live in that run's coordination service. An
    earlier run's files are deleted only when asked (`--overwrite`)."""
    earlier = _earlier_run(workdir)
    if earlier and not overwrite:
        raise ValueError(f"{workdir} holds an earlier parameter-server run "
                         f"({', '.join(earlier)}); use a new --workdir, or pass --overwrite "
                         "to delete it and start over")
    os.makedirs(workdir, exist_ok=True)
    for name in earlier:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def run_ps(*, workdir: str, config: ps_config.PSConfig, data_config,
           overwrite: bool = False, on_ready=None) -> dict:
    """Checks the config, then runs the job; metrics go to workdir/metrics.jsonl.

    `data_config` is the data config of ps.task (LMDataConfig for 'lm', ClassifyDataConfig
    for 'classify'). The task is built through lmjax.train.registry.TASKS, so the model's
    sizes (vocabulary, classes) come from the data (tokenizer saved in WORKDIR/tokenizer)."""
    _require_model(config)
    if config.task not in ps_tasks():
        raise ValueError(f"unknown ps.task {config.task!r}; known: {', '.join(ps_tasks())}")
    _start_over(workdir, overwrite)
    task = TASKS.get(config.task).build(config.model, data_config, workdir)
    config = dataclasses.replace(config, model=task.config)
    check(config, task)
    if on_ready is not None:
        on_ready()
    summary = TRANSPORTS.get(config.transport)(workdir=workdir, config=config, task=task,
                                               data_config=data_config)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
