"""Checkpoints through orbax: async, atomic, the last K kept plus the best by eval loss.

A checkpoint holds the train state (params, optimiser state, step, rng), the data
iterator's state and a small JSON record (best eval so far, model config). Orbax
writes into a temporary directory and renames it when complete, so a killed run never
leaves a half-written checkpoint behind; leftovers are removed at the next start.
"""

import dataclasses
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class IncompatibleCheckpointError(ValueError):
    """The workdir's checkpoint does not fit the configured model."""


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
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state, data_iter, meta: dict, eval_loss: float | None = None):
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = ocp.args.JsonSave(data_iter.get_state())
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)

    def check_compatible(self, step: int, abstract_state) -> None:
        """Raises IncompatibleCheckpointError naming the first parameter whose shape differs."""
        state = self.manager.item_metadata(step)["state"]
        mismatch = _first_mismatch(_shapes(state["params"]), _shapes(abstract_state.params))
        if mismatch:
            name, saved, wanted = mismatch
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.manager.directory} does not match the "
                f"configured model: parameter {name} has shape {saved} in the "
                f"checkpoint but {wanted} in the config. Use a new --workdir or "
                "the config that wrote this checkpoint (its config.gin)."
            )
        self._check_carry(step, state, getattr(abstract_state, "carry", None))

    def _check_carry(self, step: int, state, wanted_carry) -> None:
        """The carried state (an RNN's, one row per batch row) must match too."""
        saved_carry = state["carry"] if "carry" in state.keys() else None
        mismatch = _first_mismatch(_shapes(saved_carry or {}), _shapes(wanted_carry or {}))
        if mismatch:
            name, saved, wanted = mismatch
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.manager.directory} does not match the "
                f"configured run: carried state {name or 'carry'} has shape "
                f"{saved} in the checkpoint but {wanted} in the config "
                "(train.batch_size sets its rows). Resume with the config that wrote it "
                "(its config.gin) or use a new --workdir."
            )

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restores onto the shardings carried by `abstract_state` (any mesh)."""
        self.check_compatible(step, abstract_state)
        target = self._restore_target(step, abstract_state)
        args = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_iter is not None:
            data_iter.set_state(restored["data"])
        state = restored["state"]
        if target is not abstract_state:
            state = abstract_state.replace(**state)
        return state, restored["meta"]

    def _restore_target(self, step: int, abstract_state):
        """Checkpoints written before states had a `carry` field lack its entry; orbax
        refuses a target with an extra entry, so such a state (with nothing to carry)
        restores through a dict of the other fields."""
        saved = self.manager.item_metadata(step)["state"]
        if getattr(abstract_state, "carry", 0) is None and "carry" not in saved.keys():
            return {f.name: getattr(abstract_state, f.name)
                    for f in dataclasses.fields(abstract_state) if f.name != "carry"}
        return abstract_state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'block0/attn/qkv/kernel': shape} for every array-like leaf."""

    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(path): tuple(leaf.shape) for path, leaf in leaves}
