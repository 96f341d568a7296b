"""Device meshes and logical-axis sharding.

Arrays name their dimensions with logical axes ('batch', 'embed', 'q_heads', 'cache_seq', ...); a rules
table maps each to mesh axes ('data', 'fsdp', 'model') or to nothing (replicated). Parameters, activations
and KV caches read the same table.

Inside jit, :func:`constrain` pins an activation to the mesh of an explicit :class:`MeshRules` (a hashable
static argument of the jitted function) or, when none is given, to the mesh set with JAX's own
``jax.set_mesh`` context (:func:`use_mesh`) — both are part of the jit cache key, so whether a program is
sharded never depends on which call traced it first. Without either it is the identity, and the same code
runs unsharded.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axes (a tuple shards one dimension over several mesh axes), as hashable pairs.
Rules = tuple[tuple[str, Optional[tuple[str, ...]]], ...]
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", ("fsdp",)),
    ("vocab", ("model",)),
    ("q_heads", ("model",)),
    ("kv_heads", ("model",)),
    ("head_dim", None),
    ("mlp", ("model",)),
    ("layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
    ("cache_heads", ("model",)),
    ("lora_rank", None),
)


def rules_table(rules: Union[Rules, Mapping, None] = None) -> dict:
    """The rules as a dict (DEFAULT_RULES when None)."""
    return dict(DEFAULT_RULES if rules is None else (rules.items() if isinstance(rules, Mapping) else rules))


def as_rules(rules: Union[Rules, Mapping, None]) -> Rules:
    """Rules in their hashable form (pairs), for static arguments."""
    return tuple(sorted(rules_table(rules).items(), key=lambda kv: kv[0]))


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
    return Mesh(devices.reshape(-1)[:needed].reshape(sizes), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_flag(text: str) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4} (for absl flags)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if not size:
            raise ValueError(f"mesh flag {text!r}: expected name=size pairs like data=2,model=4")
        try:
            out[name.strip()] = int(size)
        except ValueError:
            raise ValueError(f"mesh flag {text!r}: {size!r} is not an integer") from None
    return out


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the 'batch' axis splits on ``mesh``."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def logical_to_spec(axes: Sequence[str | None], mesh, shape: Sequence[int] | None = None,
                    rules: Union[Rules, Mapping, None] = None) -> PartitionSpec:
    """PartitionSpec for logical ``axes``. A dimension that the mesh axes do not divide is replicated
    (e.g. 2 kv-heads on a 4-way model axis), and each mesh axis is used at most once."""
    table = rules_table(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        mesh_axes = tuple(a for a in (table.get(name) or ()) if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
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


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh with its logical-axis rules: hashable, so jitted functions take it as a static argument."""

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "rules", as_rules(self.rules))

    def spec(self, axes, shape=None) -> PartitionSpec:
        return logical_to_spec(axes, self.mesh, shape, self.rules)

    def sharding(self, axes, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))


def _context_mesh():
    """The mesh set with JAX's own context (``jax.set_mesh``), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, axes: Sequence[str | None], plan: MeshRules | None = None) -> jax.Array:
    """``with_sharding_constraint`` by logical axes on ``plan``'s mesh, else on JAX's context mesh (default
    rules); the identity when there is neither."""
    if plan is not None:
        return jax.lax.with_sharding_constraint(x, plan.sharding(axes, x.shape))
    mesh = _context_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh, x.shape))


def use_mesh(mesh: Mesh):
    """JAX's own mesh context (part of the jit cache key): ``with sharding.use_mesh(mesh): ...``."""
    return jax.set_mesh(mesh)
