"""One function per CLI command; each imports only its own stack.

`train`, `eval` and `bench` build the task with its data; `sample`, `serve` and
`translate` read the run's config, tokenizer and best parameters only (no corpus,
optimiser or train step); `ps` runs the parameter server; `launch` starts local
processes that run one of these as one jax.distributed job. Every function takes the
parsed command line after gin has been parsed (lmjax/main.py) and turns the bindings
into config objects with `configs.bound`.
"""

import argparse
import dataclasses
import os
import tempfile

from lmjax import configs
from lmjax.errors import RunError
from lmjax.parallel.mesh import MeshConfig
from lmjax.ps.config import PSConfig
from lmjax.train.config import TrainConfig


def write_config(workdir: str) -> None:
    """Saves the parsed gin config as WORKDIR/config.gin (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "config.gin.tmp")
    with open(tmp, "w") as f:
        f.write(configs.config_text())
    os.replace(tmp, os.path.join(workdir, "config.gin"))


def build_task(config: TrainConfig, workdir: str):
    """The task `train.task` names, with its data (the tokenizer lives in WORKDIR)."""
    from lmjax.train.registry import TASKS

    config.check_model()
    builder = TASKS.get(config.task)
    return builder.build(config.model, configs.bound(builder.data), workdir)


def _run_parts():
    """(train config, mesh, rules); the mesh first, as it may set the CPU device count.
    The model config takes the mesh's tensor-parallel implementation (mesh.tensor_impl),
    the train config the `prune` bindings."""
    from lmjax.train.prune import PruneConfig

    mesh_config = configs.bound(MeshConfig)
    mesh, rules = mesh_config.build()
    config = configs.bound(TrainConfig)
    config = dataclasses.replace(config, model=mesh_config.configure(config.model),
                                 prune=configs.bound(PruneConfig))
    return config, mesh, rules


def train(args: argparse.Namespace) -> dict:
    from lmjax.parallel import distributed

    # Joins a multi-process job (flags, `lmjax launch` or a cluster) before the mesh
    # creates the backend; a single-process run joins nothing.
    job = distributed.job_from(args.coordinator_address, args.num_processes,
                               args.process_id, force=args.distributed,
                               heartbeat_timeout=args.heartbeat_timeout)
    if job is not None:
        distributed.initialize(job)
    with distributed.exit_at_once_on_error():
        from lmjax.train import trainer

        config, mesh, rules = _run_parts()
        # Process 0 prepares the data and writes the tokenizer; the others then read them.
        task = distributed.process_zero_first(lambda: build_task(config, args.workdir))
        return trainer.train(task=task, config=config, mesh=mesh, rules=rules,
                             workdir=args.workdir, on_ready=lambda: write_config(args.workdir))


def evaluate(args: argparse.Namespace) -> dict:
    from lmjax.train import trainer

    config, mesh, rules = _run_parts()
    if args.texts and not args.train_logits:
        raise ValueError("--texts names the inputs of --train_logits; pass both")
    task = build_task(config, args.workdir)
    if args.train_logits:
        import numpy as np

        texts = None
        if args.texts:
            with open(args.texts, encoding="utf-8") as f:
                texts = f.read().splitlines()
        logits = trainer.train_logits(task=task, config=config, mesh=mesh, rules=rules,
                                      workdir=args.workdir, texts=texts)
        with open(args.train_logits, "wb") as f:
            np.save(f, logits)
        return {"train_logits": args.train_logits, "examples": len(logits)}
    return trainer.evaluate_best(task=task, config=config, mesh=mesh, rules=rules,
                                 workdir=args.workdir)


def bench(args: argparse.Namespace) -> dict:
    from lmjax.train.bench import benchmark

    config, mesh, rules = _run_parts()
    with tempfile.TemporaryDirectory(prefix="lmjax-bench-") as scratch:  # DIR stays untouched
        task = build_task(config, scratch)
        return benchmark(task=task, config=config, mesh=mesh, rules=rules,
                         steps=args.bench_steps, name=args.workdir,
                         collectives=args.collectives)


def sample(args: argparse.Namespace) -> str:
    from lmjax.serve import sample as sampling
    from lmjax.serve.generate import SamplingParams

    # Checked before the checkpoint loads: a bad option fails at once (ValueError, exit 1).
    options = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k or 0, seed=args.seed)
    loaded = sampling.load_best(args.workdir, configs.bound(TrainConfig))
    text = sampling.sample(loaded, args.prompt, options)
    print(text)
    return text


def serve(args: argparse.Namespace) -> None:
    try:
        from lmjax.serve import server
    except ImportError as err:
        raise RunError(f"`lmjax serve` needs the HTTP serving packages, and {err.name} is "
                       "missing: pip install -e '.[serve]' (requirements.txt has them)") from err
    from lmjax.serve.sample import load_best

    loaded = load_best(args.workdir, configs.bound(TrainConfig))
    name = os.path.basename(os.path.abspath(args.workdir)) or "lmjax"
    server.serve(loaded, name=name, host=args.host, port=args.port, api_key=args.api_key,
          slots=args.slots, scheduler=args.scheduler, max_jobs=args.max_queue,
          quantize=args.quantize, max_batch=args.max_batch)


def translate(args: argparse.Namespace) -> list[str]:
    from lmjax.data.config import TranslationDataConfig
    from lmjax.serve import translate as translating

    if args.input is None:
        raise ValueError("translate needs --input=FILE (one source sentence a line)")
    if args.beam < 1:
        raise ValueError(f"--beam={args.beam}: give a beam of at least 1 (1 is greedy)")
    with open(args.input, encoding="utf-8") as f:  # FileNotFoundError names the path
        lines = f.read().splitlines()
    loaded = translating.load_best(args.workdir, configs.bound(TrainConfig),
                                   configs.bound(TranslationDataConfig))
    out = translating.translate_lines(loaded, lines, beam=args.beam, alpha=args.length_penalty,
                                      batch_size=args.batch_size, name=args.input)
    text = "".join(line + "\n" for line in out)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)
    else:
        print(text, end="")
    return out


def ps(args: argparse.Namespace) -> dict:
    from lmjax.ps.run import run_ps
    from lmjax.train.registry import TASKS

    config = configs.bound(PSConfig)
    data_config = configs.bound(TASKS.get(config.task).data)
    return run_ps(workdir=args.workdir, config=config, data_config=data_config,
                  overwrite=args.overwrite,
                  on_ready=lambda: write_config(args.workdir))


def launch(args: argparse.Namespace) -> None:
    from lmjax.parallel.launch import LaunchConfig
    from lmjax.parallel.launch import launch as run_job

    run_job(LaunchConfig(command=tuple(args.child_command), num_processes=args.num_processes,
                         devices_per_process=args.devices_per_process, port=args.port,
                         module=args.module))


COMMANDS = {"train": train, "eval": evaluate, "sample": sample, "bench": bench, "ps": ps,
            "serve": serve, "launch": launch, "translate": translate}
