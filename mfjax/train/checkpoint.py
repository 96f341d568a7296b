"""Training checkpoints (IBTUNE.md §8): an orbax ``CheckpointManager`` with four items per step.

    <dir>/<step>/lora/       the LoRA factors
    <dir>/<step>/opt_state/  the optimizer state (Adam moments, MultiSteps accumulators, schedule counts)
    <dir>/<step>/carry/      the per-slot carry (mean fields, the reference lag's previous chunk)
    <dir>/<step>/meta/       JSON: step, stage, settings, LoRA spec, base model, data-walk state, seed, versions

Pytrees are stored as flat dicts of their leaves, keyed by leaf order and path, and restored into the
structure of a template (``jax.eval_shape`` of the fresh objects): optax's named tuples and mfjax's
dataclasses then never meet orbax's tree handling, and values come back bit for bit. PRNG keys are
derived from (seed, event, chunk, sample), so the seed and the walk state in ``meta`` are the whole RNG state.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("lora", "opt_state", "carry")


_EMPTY = "empty"  # an item with no arrays (e.g. a carry-less stage) stores one placeholder scalar


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        return {_EMPTY: np.zeros((), np.int32)}
    return {f"{i:05d}_{re.sub(r'[^A-Za-z0-9_]+', '_', jax.tree_util.keystr(p)).strip('_')}": v
            for i, (p, v) in enumerate(leaves)}


def _unflat(template, flat: dict[str, Any]):
    leaves, treedef = jax.tree.flatten(template)
    keys = sorted(k for k in flat if k != _EMPTY)
    if len(keys) != len(leaves):
        raise ValueError(f"the checkpoint item holds {len(keys)} arrays, this run's state has {len(leaves)} "
                         f"(another LoRA rank, targets or optimizer than the checkpoint's?)")
    for key, leaf in zip(keys, leaves):
        if tuple(flat[key].shape) != tuple(leaf.shape):
            raise ValueError(f"checkpoint array {key} has shape {tuple(flat[key].shape)}, this run expects "
                             f"{tuple(leaf.shape)}")
    return jax.tree.unflatten(treedef, [flat[k] for k in keys])


class TrainCheckpointer:
    """Saves and restores (state, carry, meta) of a training run.

    Args:
      directory: the run's checkpoint folder (created when saving).
      keep: newest steps kept.
      async_save: save in the background (worth it on accelerators; a later save or :meth:`close` waits).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS}
        handlers["meta"] = ocp.JsonCheckpointHandler()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, carry, meta: dict) -> None:
        """Saves the training state after optimizer step ``step`` (replacing an existing one of that number)."""
        if step in self.manager.all_steps():
            self.manager.delete(step)
        items = {"lora": state.lora, "opt_state": state.opt_state, "carry": carry}
        args = {name: ocp.args.StandardSave(_flat(tree)) for name, tree in items.items()}
        self.manager.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, state_template, carry_template, step: Optional[int] = None):
        """(state, carry, meta) of ``step`` (latest by default), shaped like the templates (arrays or
        ``jax.ShapeDtypeStruct`` with shardings; TrainState's ``step`` counter comes from its own item)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        def abstract(tree):
            flat = _flat(jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree))
            return {k: (jax.ShapeDtypeStruct((), jnp.int32) if k == _EMPTY else v) for k, v in flat.items()}

        targets = {"lora": state_template.lora, "opt_state": state_template.opt_state, "carry": carry_template}
        args = {name: ocp.args.StandardRestore(abstract(tree)) for name, tree in targets.items()}
        out = self.manager.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        state = type(state_template)(step=jnp.asarray(meta["micro_step"], jnp.int32),
                                     lora=_unflat(state_template.lora, out["lora"]),
                                     opt_state=_unflat(state_template.opt_state, out["opt_state"]))
        return state, _unflat(carry_template, out["carry"]), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
