"""Runs a parameter-server job on the chosen transport, after checking the config."""

import dataclasses
import json
import os
import shutil

from lmjax.data.config import LMDataConfig
from lmjax.data.pipelines import LMData, load_lm_data
from lmjax.ps import config as ps_config
from lmjax.ps.codecs import CODECS
from lmjax.ps.inproc import DELAYS, run_inproc
from lmjax.ps.policies import POLICIES
from lmjax.ps.server import LR_SCALINGS
from lmjax.ps.worker import param_shapes
from lmjax.registry import Registry
from lmjax.train.optim import OPTIMIZERS

TRANSPORTS: Registry = Registry("transport")


@TRANSPORTS.register("inproc")
def _inproc(*, workdir: str, config: ps_config.PSConfig, data: LMData,
            data_config: LMDataConfig) -> dict:
    del data_config
    result = run_inproc(workdir=workdir, config=config, data=data)
    train = [r for r in result.records if r["split"] == "train"]
    summary = {"updates": len(train), "loss": train[-1]["loss"] if train else None,
               "virtual_time": train[-1]["time"] if train else 0.0}
    print(f"ps inproc: {summary['updates']} updates, last loss {summary['loss']:.4f}, "
          f"virtual time {summary['virtual_time']:.1f}")
    return summary


@TRANSPORTS.register("jax_distributed")
def _jax_distributed(*, workdir: str, config: ps_config.PSConfig, data: LMData,
                     data_config: LMDataConfig) -> dict:
    del data  # every worker process loads its own
    from lmjax.ps.launch import check_port, supervise
    from lmjax.ps.roles import RunSpec

    port = check_port(config.port)
    spec = RunSpec.create(os.path.abspath(workdir), config, data_config, f"127.0.0.1:{port}")
    path = os.path.join(spec.workdir, "ps_spec.json")
    spec.save(path)
    summary = supervise(spec, path)
    print(f"ps jax_distributed: {summary['updates']} updates in {summary['seconds']:.1f} s")
    return summary


def check(config: ps_config.PSConfig) -> None:
    """Every contradiction in the config is an error here, before any process starts."""
    if config.model is None:
        raise ValueError("ps.model is not set; bind a model config, for example "
                         "ps.model = @GPTConfig() (see configs/ps/)")
    known = {"transport": TRANSPORTS.names(), "policy": POLICIES.names(),
             "optimizer": OPTIMIZERS.names(), "lr_scaling": LR_SCALINGS.names(),
             "delay": DELAYS.names(), "compression": CODECS.names()}
    ps_config.validate(config, len(param_shapes(config.model)), known)


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


def run_ps(*, workdir: str, config: ps_config.PSConfig, data_config: LMDataConfig,
           overwrite: bool = False, on_ready=None) -> dict:
    """Checks the config, then runs the job; metrics go to workdir/metrics.jsonl.

    The model's vocabulary comes from the data's tokenizer (saved in WORKDIR/tokenizer)."""
    check(config)  # the number of parameter arrays does not depend on the vocabulary
    _start_over(workdir, overwrite)
    data = load_lm_data(**dataclasses.asdict(data_config),
                        tokenizer_dir=os.path.join(workdir, "tokenizer"))
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, vocab_size=data.tokenizer.vocab_size))
    if on_ready is not None:
        on_ready()
    summary = TRANSPORTS.get(config.transport)(workdir=workdir, config=config, data=data,
                                               data_config=data_config)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
