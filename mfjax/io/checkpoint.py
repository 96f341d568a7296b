"""Orbax checkpoints of decoder weights, self-describing through a JSON item with the HF config.

Layout of ``path`` (one :class:`orbax.checkpoint.CheckpointManager` directory)::

    path/<step>/params/   the stacked weights as a nested dict (StandardSave; :meth:`Weights.to_tree`)
    path/<step>/meta/     JSON: {"format", "version", "hf_config", ...extra metadata}

Restores read shapes and dtypes from the checkpoint, so no model code is needed to restore, and place
every array directly onto the requested shardings (each host reads only its shards).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mfjax.config import ModelConfig
from mfjax.models.weights import Weights, map_specs, weight_specs

FORMAT = "mfjax-params"
VERSION = 1


def _manager(path: str | os.PathLike, *, read_only: bool) -> ocp.CheckpointManager:
    directory = os.path.abspath(os.fspath(path))
    if read_only and not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        # Saves here are one-off (import, export, end of training); synchronous keeps callers simple.
        enable_async_checkpointing=False,
    )
    handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _resolve_step(mngr: ocp.CheckpointManager, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps in {mngr.directory}")
    if step is None:
        return mngr.latest_step()
    if step not in steps:
        raise FileNotFoundError(f"no step {step} in {mngr.directory} (steps: {sorted(steps)})")
    return step


def save_checkpoint(
    path: str | os.PathLike,
    weights: Weights,
    cfg: ModelConfig,
    step: int = 0,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Saves ``weights`` and ``cfg`` as step ``step``.

    Args:
      path: the checkpoint directory (created if needed); other steps in it are kept.
      weights: the model's :class:`Weights`, possibly sharded.
      cfg: its config; stored as the HF ``config.json`` dict so the checkpoint describes itself.
      step: step number; an existing step of that number is replaced.
      metadata: extra JSON-serialisable entries stored with the config (e.g. ``generation_config``).

    Returns:
      The absolute checkpoint directory.
    """
    mngr = _manager(path, read_only=False)
    params = weights.to_tree()
    meta = {**dict(metadata or {}), "format": FORMAT, "version": VERSION, "hf_config": cfg.to_hf()}
    if step in mngr.all_steps():
        mngr.delete(step)
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    mngr.close()
    return os.fspath(mngr.directory)


def read_metadata(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint step (latest by default): ``hf_config`` and any extras."""
    mngr = _manager(path, read_only=True)
    step = _resolve_step(mngr, step)
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    mngr.close()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{mngr.directory}/{step} is not an mfjax parameter checkpoint")
    return meta


def latest_step(path: str | os.PathLike) -> int | None:
    """The newest step in ``path``, or ``None`` when it holds none."""
    mngr = _manager(path, read_only=True)
    step = mngr.latest_step()
    mngr.close()
    return step


def restore_checkpoint(
    path: str | os.PathLike,
    step: int | None = None,
    shardings: Any = None,
    dtype=None,
) -> tuple[ModelConfig, Weights]:
    """Restores ``(cfg, weights)`` from a checkpoint written by :func:`save_checkpoint`.

    Args:
      path: the checkpoint directory.
      step: which step; the latest when ``None``.
      shardings: optional :class:`Weights` of ``jax.sharding.Sharding``; arrays are read straight onto
        them. Default: the first local device.
      dtype: cast floating-point params to this dtype while reading; ``None`` keeps the stored dtypes.
    """
    meta = read_metadata(path, step)
    cfg = ModelConfig.from_hf(meta["hf_config"])
    mngr = _manager(path, read_only=True)
    step = _resolve_step(mngr, step)
    stored = mngr.item_metadata(step)["params"]
    stored = getattr(stored, "tree", stored)
    _check_shapes(cfg, stored, f"{mngr.directory}/{step}")

    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shard_leaves = (
        jax.tree.leaves(shardings.to_tree(), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if shardings is not None
        else None
    )
    meta_leaves, treedef = jax.tree.flatten(stored, is_leaf=_is_array_meta)
    if shard_leaves is not None and len(shard_leaves) != len(meta_leaves):
        raise ValueError(f"shardings has {len(shard_leaves)} leaves, the checkpoint holds {len(meta_leaves)} arrays")

    def abstract(m, sharding):
        want = m.dtype if dtype is None or not jnp.issubdtype(m.dtype, jnp.floating) else jnp.dtype(dtype)
        return jax.ShapeDtypeStruct(tuple(m.shape), want, sharding=sharding)

    target = jax.tree.unflatten(
        treedef,
        [abstract(m, shard_leaves[i] if shard_leaves is not None else default) for i, m in enumerate(meta_leaves)],
    )
    params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    mngr.close()
    return cfg, Weights.from_tree(params)


def _is_array_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_shapes(cfg: ModelConfig, stored: Any, where: str) -> None:
    """The stored tree must be the parameter tree of ``cfg`` (same paths, same shapes)."""
    want = jax.tree_util.tree_flatten_with_path(map_specs(lambda s: s.shape, weight_specs(cfg)).to_tree(),
                                                is_leaf=lambda x: isinstance(x, tuple))[0]
    got = jax.tree_util.tree_flatten_with_path(stored, is_leaf=_is_array_meta)[0]
    want = {_path_str(p): tuple(s) for p, s in want}
    got = {_path_str(p): tuple(m.shape) for p, m in got}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        details = "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
                ", ".join(f"{k} stored {list(got[k])} expected {list(want[k])}" for k in wrong),
            )
            if part
        )
        raise ValueError(f"{where}: parameters do not match the stored config: {details}")
