"""Device meshes and logical-axis sharding.

Arrays name their dimensions with logical axes ('batch', 'embed', 'q_heads', ...); a rules table maps
each to a mesh axis ('data', 'fsdp', 'model') or to nothing (replicated). Parameter shardings derive from
:func:`mfjax.models.params.param_specs`; activations are pinned inside jit with :func:`constrain`, which
is a no-op outside :func:`use_mesh` so the same code runs unsharded.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axes (a tuple shards one dimension over several mesh axes).
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": ("fsdp",),
    "vocab": ("model",),
    "q_heads": ("model",),
    "kv_heads": ("model",),
    "head_dim": None,
    "mlp": ("model",),
    "layers": None,
    "cache_seq": None,
}

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping] | None] = contextvars.ContextVar("mfjax_mesh", default=None)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """A mesh over ``devices`` with axes ('data', 'fsdp', 'model').

    ``shape`` maps axis names to sizes (missing axes get 1; one axis may be -1 for "the rest"), or is a
    sequence in MESH_AXES order. Axes are Auto (not Explicit, the ``jax.make_mesh`` default since 0.9),
    so plain sharded matmuls work and shardings propagate from inputs and constraints.
    """
    devices = np.asarray(devices if devices is not None else jax.devices())
    if shape is None:
        shape = {"data": -1}
    if not isinstance(shape, Mapping):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if devices.size % known:
            raise ValueError(f"{devices.size} devices cannot fill mesh {dict(shape)}")
        sizes[sizes.index(-1)] = devices.size // known
    needed = int(np.prod(sizes))
    if needed > devices.size:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {needed} devices, have {devices.size}")
    # A smaller mesh runs on the first devices (e.g. data=1 on a multi-device host).
    return Mesh(devices.reshape(-1)[:needed].reshape(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_flag(text: str) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4} (for absl flags)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if not size:
            raise ValueError(f"mesh flag {text!r}: expected name=size pairs like data=2,model=4")
        out[name.strip()] = int(size)
    return out


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                    rules: Mapping[str, Any] | None = None) -> PartitionSpec:
    """PartitionSpec for logical ``axes``. A dimension that the mesh axes do not divide is replicated
    (e.g. 2 kv-heads on a 4-way model axis), and each mesh axis is used at most once."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        mesh_axes = tuple(a for a in (rules.get(name) or ()) if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or (shape is not None and shape[i] % size):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
    return PartitionSpec(*spec)


def named_sharding(axes, mesh: Mesh, shape=None, rules=None) -> NamedSharding:
    """NamedSharding for logical ``axes`` on ``mesh``."""
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape, rules))


def param_shardings(cfg, mesh: Mesh, rules=None, layers_unstacked: bool = False) -> Any:
    """Tree of NamedSharding matching the parameter tree of ``cfg``."""
    from mfjax.models.params import map_specs, param_specs

    specs = param_specs(cfg)
    shardings = map_specs(lambda s: named_sharding(s.axes, mesh, s.shape, rules), specs)
    if layers_unstacked:
        per_layer = map_specs(
            lambda s: named_sharding(s.axes[1:], mesh, s.shape[1:], rules), specs["layers"])
        shardings = {**shardings, "layers": [per_layer] * cfg.num_layers}
    return shardings


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """Within this context, :func:`constrain` pins activations to ``mesh`` by the logical rules."""
    token = _ACTIVE.set((mesh, DEFAULT_RULES if rules is None else rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh set by :func:`use_mesh`, or None."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes when a mesh is active; identity otherwise."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, mesh, x.shape, rules))


def shard_batch(x: Any, mesh: Mesh, axes=("batch",)) -> Any:
    """Places arrays with a leading batch dimension onto ``mesh`` (other dims replicated)."""
    return jax.tree.map(lambda a: jax.device_put(a, named_sharding(tuple(axes) + (None,) * (a.ndim - len(axes)),
                                                                    mesh, a.shape)), x)
