"""Command line: `python -m lmjax.main {train,eval,sample} --workdir=DIR --gin_file=F ...`.

Thin by design: parse flags and gin, then call library functions.
"""

import argparse
import functools
import os
import sys

import gin

EXIT_BAD_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmjax", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train", "eval", "sample", "bench"])
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics)")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file; repeatable (default for eval/sample: "
                        "WORKDIR/config.gin)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="gin binding such as train.num_steps=100; repeatable")
    sample = parser.add_argument_group("sample")
    sample.add_argument("--prompt", default="\n")
    sample.add_argument("--max_new_tokens", type=int, default=500)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top_k", type=int, default=200)
    sample.add_argument("--seed", type=int, default=0)
    bench = parser.add_argument_group("bench")
    bench.add_argument("--bench_steps", type=int, default=20, help="timed steps")
    return parser


def _parse_gin(files: list[str], params: list[str]) -> None:
    """Parses gin; a bad file or an unknown binding exits with code 2 naming it."""
    from lmjax import entry  # noqa: F401  (registers the configurables)

    for path in files:
        if not os.path.exists(path):
            _fail(f"gin file {path!r} does not exist")
    try:
        gin.parse_config_files_and_bindings(files, params, finalize_config=True)
    except (ValueError, KeyError, SyntaxError, ImportError) as err:
        _fail(f"bad gin config: {err}")


def _fail(message: str) -> None:
    print(f"lmjax: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_CONFIG)


def _write_config(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "config.gin.tmp")
    with open(tmp, "w") as f:
        f.write(gin.config_str())
    os.replace(tmp, os.path.join(workdir, "config.gin"))


def run(argv: list[str] | None = None) -> object:
    args = _parser().parse_args(argv)
    files = args.gin_file
    if not files and args.command != "train":
        files = [os.path.join(args.workdir, "config.gin")]
    if not files:
        _fail("train needs at least one --gin_file (see configs/experiments/)")
    _parse_gin(files, args.gin_param)
    from lmjax import entry
    from lmjax.serve.sample import sample_best
    from lmjax.train import bench, trainer

    runners = {
        "train": trainer.train,
        "eval": trainer.evaluate_best,
        "sample": functools.partial(
            sample_best, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed),
        "bench": functools.partial(bench.benchmark, steps=args.bench_steps),
    }
    on_ready = functools.partial(_write_config, args.workdir) if args.command == "train" else None
    return entry.train(args.workdir, on_ready=on_ready, runner=runners[args.command])


def main() -> None:
    from lmjax.data.builders import MissingDataError
    from lmjax.train.checkpoint import IncompatibleCheckpointError
    from lmjax.train.trainer import NonFiniteLossError

    try:
        run()
    except (IncompatibleCheckpointError, NonFiniteLossError, MissingDataError, ValueError,
            KeyError, FileNotFoundError) as err:
        print(f"lmjax: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
