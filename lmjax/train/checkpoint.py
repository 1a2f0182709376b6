"""Checkpoints through orbax: async, atomic, the last K kept plus the best by eval loss.

A checkpoint holds the train state (step, params, optimiser state, rng, carry), the
data iterator's state and a small JSON record (`meta`: best eval so far and the
checkpoint format). Orbax writes into a temporary directory and renames it when
complete, so a killed run never leaves a half-written checkpoint behind; leftovers are
removed at the next start. `eval`, `sample`, `serve` and fine-tuning read only the
parameters (`restore_params`), without an optimiser.
"""

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lmjax.errors import RunError
from lmjax.models.transformer import match_layout
from lmjax.parallel.distributed import barrier

# Written into every checkpoint's meta; checkpoints without it (or with another value)
# come from an older layout of the train state and are refused with one clear error.
FORMAT = 2


class IncompatibleCheckpointError(ValueError):
    """The workdir's checkpoint does not fit the configured model."""


class CheckpointError(RunError):
    """A checkpoint could not be written, or none in the workdir can be read."""


class SaveError(CheckpointError):
    """A checkpoint could not be written; orbax's signalling threads then wait for ever."""

    exit_at_once = True


def _cause(err: BaseException) -> str:
    """The first line of an error, which names the file for I/O errors."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _eval_loss(metrics) -> float:
    return metrics["eval_loss"]


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """`read_only` (eval, sample) never deletes anything, e.g. a running job's temp dirs."""
        keep_policy = policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            # reverse=True keeps the lowest eval loss.
            policies.BestN(get_metric_fn=_eval_loss, reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep_policy,
            best_fn=_eval_loss,
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        # orbax refuses relative paths when restoring ("Checkpoint path should be absolute").
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state, data_iter, meta: dict, eval_loss: float | None = None):
        """Starts writing `step` in the background; raises CheckpointError if this or an
        earlier save failed (so a run never trains on without its checkpoints)."""
        meta = {**meta, "format": FORMAT}
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = ocp.args.JsonSave(data_iter.get_state())
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        try:
            self.manager.check_for_errors()
            self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics,
                              force=True)
        except Exception as err:  # noqa: BLE001  (orbax raises what the file system raised)
            raise SaveError(f"saving a checkpoint in {self.directory} failed at step "
                                  f"{step} or before: {_cause(err)}") from err

    def read_meta(self, step: int) -> dict:
        """The step's meta record; raises IncompatibleCheckpointError for older formats."""
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("format") != FORMAT:
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.directory} was written by an older lmjax "
                f"(checkpoint format {meta.get('format', 1)}, this version reads {FORMAT}); "
                "retrain in a new --workdir, or use the lmjax version that wrote it.")
        return meta

    def check_compatible(self, step: int, abstract_state) -> None:
        """Raises IncompatibleCheckpointError naming the first parameter (or carried state)
        whose shape differs from the configured run's."""
        saved = self.manager.item_metadata(step)["state"]
        self._check(step, "parameter", saved["params"], abstract_state.params)
        saved_carry = saved["carry"] if "carry" in saved.keys() else None
        self._check(step, "carried state", saved_carry, abstract_state.carry,
                    "(train.batch_size sets its rows)")

    def _check(self, step: int, what: str, saved, wanted, hint: str = "") -> None:
        mismatch = _first_mismatch(flat_shapes(saved or {}), flat_shapes(wanted or {}))
        if mismatch:
            name, have, want = mismatch
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the configured "
                f"run: {what} {name} has shape {have} in the checkpoint but {want} in the "
                f"config {hint}. Use a new --workdir or the config that wrote this checkpoint "
                "(its config.gin).".replace("  ", " "))

    def restore(self, step: int, abstract_state, data_iter=None):
        """(state, meta) of `step`, placed on the shardings carried by `abstract_state`."""
        meta = self.read_meta(step)
        self.check_compatible(step, abstract_state)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_iter is not None:
            data_iter.set_state(restored["data"])
        return restored["state"], meta

    def param_shapes(self, step: int, subtree: str | None = None) -> dict:
        """{'block0/attn/qkv/kernel': shape} of the saved parameters (or their subtree)."""
        saved = self.manager.item_metadata(step)["state"]["params"]
        if subtree is not None:
            saved = saved[subtree] if subtree in saved.keys() else {}
        return flat_shapes(saved)

    def restore_params(self, step: int, abstract_params, subtree: str | None = None):
        """Only the parameters of `step` (or their `subtree`, e.g. BERT's encoder "bert"),
        placed like `abstract_params` (ShapeDtypeStructs with shardings): no optimiser
        state is read, so any mesh and any optimiser can use them. Parameters saved in
        the other layer layout (`scan_layers` or not) are converted on the way."""
        self.read_meta(step)
        saved = self._saved_params(step, subtree)
        if flat_shapes(saved) == flat_shapes(abstract_params):
            return self._read_params(step, abstract_params, subtree, abstract_params)
        try:
            converted = jax.eval_shape(lambda p: match_layout(p, abstract_params), saved)
        except ValueError as err:  # a different number of layers
            raise self._mismatch(step, saved, abstract_params) from err
        if flat_shapes(converted) != flat_shapes(abstract_params):
            raise self._mismatch(step, saved, abstract_params)
        on_host = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        params = self._read_params(step, saved, subtree, on_host)
        shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
        return jax.device_put(match_layout(params, abstract_params), shardings)

    def _saved_params(self, step: int, subtree: str | None):
        """ShapeDtypeStructs of the saved parameters (or their subtree)."""
        saved = self.manager.item_metadata(step)["state"]["params"]
        saved = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved)
        if subtree is not None:
            saved = saved.get(subtree, {})
        return saved

    def _read_params(self, step: int, item, subtree: str | None, like):
        """Reads `item` (a params tree) of `step`; `like` is the tree of restore targets:
        ShapeDtypeStructs with shardings (onto a mesh) or orbax RestoreArgs."""
        if subtree is not None:
            item, like = {subtree: item}, {subtree: like}
        if jax.tree.leaves(like) and isinstance(jax.tree.leaves(like)[0], jax.ShapeDtypeStruct):
            like = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(
                sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), like)
        path = os.path.join(self.directory, str(step), "state")
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item={"params": item}, restore_args={"params": like},
            partial_restore=True))["params"]
        return restored if subtree is None else restored[subtree]

    def _mismatch(self, step: int, saved, wanted) -> IncompatibleCheckpointError:
        name, have, want = _first_mismatch(flat_shapes(saved), flat_shapes(wanted))
        return IncompatibleCheckpointError(
            f"checkpoint step {step} in {self.directory} does not match the configured "
            f"model: parameter {name} has shape {have} in the checkpoint but {want} in the "
            "config. Use the config that wrote it (its config.gin).")

    def wait(self) -> None:
        """Blocks until the saves in flight are written; CheckpointError if one failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as err:  # noqa: BLE001
            raise SaveError(f"saving a checkpoint in {self.directory} failed: "
                            f"{_cause(err)}") from err

    def restore_latest(self, abstract_state, data_iter=None):
        """(state, meta, step) of the newest checkpoint that reads back whole, or None
        when there is none; a damaged newer one is skipped with a message naming its step
        and the cause, and (unless read-only) moved aside to STEP.unreadable so that the
        run can write that step again. Checkpoints of another model are refused, not
        skipped."""
        steps = self.manager.all_steps()[::-1]
        found = self.first_intact(
            steps, lambda step: (*self.restore(step, abstract_state, data_iter), step))
        skipped = [step for step in steps if found is None or step > found[2]]
        if skipped and not self.read_only:
            for step in skipped if jax.process_index() == 0 else ():  # one mover per job
                aside = os.path.join(self.directory, f"{step}.unreadable")
                os.replace(os.path.join(self.directory, str(step)), aside)
                print(f"lmjax: moved the unreadable checkpoint step {step} to {aside}",
                      file=sys.stderr, flush=True)
            barrier("lmjax: unreadable checkpoints moved aside")
            self.manager.reload()
        return found

    def first_intact(self, steps: list[int], read):
        """read(step) of the first step that reads; CheckpointError if every one fails."""
        failures = []
        for step in steps:
            try:
                return read(step)
            except IncompatibleCheckpointError:
                raise
            except Exception as err:  # noqa: BLE001  (damage shows as any I/O or format error)
                failures.append(f"step {step}: {_cause(err)}")
                print(f"lmjax: checkpoint step {step} in {self.directory} cannot be read "
                      f"({_cause(err)}); trying an older one", file=sys.stderr, flush=True)
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} can be read: "
                                  + "; ".join(failures) + ". Delete the damaged step folders "
                                  "to start over, or restore them from a copy.")
        return None

    def close(self) -> None:
        self.manager.close()


def best_params(workdir: str, abstract_params, subtree: str | None = None, check=None):
    """(params, step) of the best checkpoint in `workdir` (the latest if none has an eval).

    `check(shapes of all saved parameters)` may raise a more specific error before
    anything is read."""
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        newest_first = checkpoints.manager.all_steps()[::-1]
        best = checkpoints.best_step()
        steps = [best] + [s for s in newest_first if s != best] if best else newest_first

        def read(step: int):
            if check is not None:
                check(checkpoints.param_shapes(step))
            return checkpoints.restore_params(step, abstract_params, subtree), step

        found = checkpoints.first_intact(steps, read)
        if found is None:
            raise FileNotFoundError(
                f"no checkpoint in {checkpoints.directory}; train first with "
                f"`lmjax train --workdir={workdir} --gin_file=...`")
        return found
    finally:
        checkpoints.close()


def as_abstract(tree, shardings):
    """ShapeDtypeStructs carrying target shardings, for restoring onto a mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _first_mismatch(saved: dict, wanted: dict) -> tuple | None:
    """(name, saved shape, wanted shape) of the first name whose shapes differ, or None."""
    for name in sorted(set(saved) | set(wanted)):
        if saved.get(name) != wanted.get(name):
            return name, saved.get(name), wanted.get(name)
    return None


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'block0/attn/qkv/kernel': shape} for every array-like leaf."""

    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(path): tuple(leaf.shape) for path, leaf in leaves}
