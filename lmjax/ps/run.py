"""Runs a parameter-server job on the chosen transport, after checking the config."""

import dataclasses
import json
import os
import shutil

from lmjax.data.pipelines import LMData
from lmjax.models import GPTConfig
from lmjax.ps import config as ps_config
from lmjax.ps.inproc import DELAYS, run_inproc
from lmjax.ps.policies import POLICIES
from lmjax.ps.server import LR_SCALINGS, OPTIMIZERS
from lmjax.ps.worker import param_shapes
from lmjax.registry import Registry

TRANSPORTS: Registry = Registry("transport")


@TRANSPORTS.register("inproc")
def _inproc(*, workdir, model_config, data, dataset_args, config) -> dict:
    result = run_inproc(workdir=workdir, model_config=model_config, data=data, config=config)
    train = [r for r in result.records if r["split"] == "train"]
    summary = {"updates": len(train), "loss": train[-1]["loss"] if train else None,
               "virtual_time": train[-1]["time"] if train else 0.0}
    print(f"ps inproc: {summary['updates']} updates, last loss {summary['loss']:.4f}, "
          f"virtual time {summary['virtual_time']:.1f}")
    return summary


@TRANSPORTS.register("jax_distributed")
def _jax_distributed(*, workdir, model_config, data, dataset_args, config) -> dict:
    from lmjax.ps.launch import check_port, supervise
    from lmjax.ps.roles import RunSpec

    port = check_port(config.port)
    spec = RunSpec(os.path.abspath(workdir), dataclasses.asdict(model_config),
                   dataclasses.asdict(config), dataset_args, f"127.0.0.1:{port}")
    path = os.path.join(spec.workdir, "ps_spec.json")
    spec.save(path)
    summary = supervise(spec, path)
    print(f"ps jax_distributed: {summary['updates']} updates in {summary['seconds']:.1f} s")
    return summary


def check(config: ps_config.PSConfig, model_config: GPTConfig) -> None:
    """Every contradiction in the config is an error here, before any process starts."""
    known = {"transport": TRANSPORTS.names(), "policy": POLICIES.names(),
             "optimizer": OPTIMIZERS.names(), "lr_scaling": LR_SCALINGS.names(),
             "delay": DELAYS.names()}
    ps_config.validate(config, len(param_shapes(model_config)), known)


def _start_over(workdir: str) -> None:
    """A run starts from scratch: shard checkpoints only serve restarts within a run,
    because the gradients they wait for live in that run's coordination service."""
    os.makedirs(workdir, exist_ok=True)
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if name in ("logs", "metrics.jsonl", "summary.json") or name.startswith("server"):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def run_ps(*, workdir: str, model_config: GPTConfig, data: LMData, dataset_args: dict,
           config: ps_config.PSConfig, on_ready=None) -> dict:
    """Checks the config, then runs the job; metrics go to workdir/metrics.jsonl."""
    check(config, model_config)
    _start_over(workdir)
    if on_ready is not None:
        on_ready()
    summary = TRANSPORTS.get(config.transport)(workdir=workdir, model_config=model_config,
                                               data=data, dataset_args=dataset_args,
                                               config=config)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
