"""Sharded forward on the eight host CPU devices of conftest: meshes, parameter shardings, constraints.

The tiny Qwen2 model (4 q-heads, 2 kv-heads, vocab 128, ffn 96, model 64) splits q-heads, vocab and ffn
4 ways on a 'model' axis of 4, while its 2 kv-heads stay replicated there by design (4 does not divide
2). A sharded forward only reorders fp32 sums (partial matmuls, all-reduces), so it equals the unsharded
one to 1e-5.
"""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_fixtures import make_tiny_hf_model
from mfjax import sharding
from mfjax.io.hf import load_hf
from mfjax.engine.generate import GenerateConfig, generate_tokens_jit
from mfjax.engine.sampling import row_keys
from mfjax.models import decoder
from mfjax.models.weights import weight_shardings

TOL = dict(atol=1e-5, rtol=1e-5)
BATCH, SEQ = 8, 12

MESHES = {
    "data2_model4": {"data": 2, "model": 4},
    "data8": {"data": 8},
    "fsdp2_model4": {"fsdp": 2, "model": 4},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir, _ = make_tiny_hf_model("qwen2", tmp_path_factory.mktemp("sharding"), seed=3)
    cfg, params = load_hf(model_dir)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.intermediate_size) == (4, 2, 128, 96)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, size=(BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    for row in range(BATCH):  # left padding of 0..7 tokens
        mask[row, :row] = 0
        tokens[row, :row] = 0
    ref = np.asarray(jax.jit(decoder.forward_logits, static_argnums=1)(params, cfg, tokens, mask))
    return dict(dir=model_dir, cfg=cfg, params=params, tokens=tokens, mask=mask, ref=ref)


def _spec(tree_of_shardings):
    return jax.tree.map(lambda s: s.spec, tree_of_shardings).to_tree()


def _shard_shape(array):
    shapes = {tuple(s.data.shape) for s in array.addressable_shards}
    assert len(shapes) == 1
    return shapes.pop()


def test_param_shardings_split_on_model_axis(tiny):
    cfg = tiny["cfg"]
    mesh = sharding.make_mesh(MESHES["data2_model4"])
    shardings = weight_shardings(cfg, mesh)
    spec = _spec(shardings)
    layers = spec["layers"]
    assert spec["embed"] == P("model", None)  # vocab split 4 ways
    assert spec["lm_head"] == P(None, "model")
    assert layers["q"] == P(None, None, "model", None)
    assert layers["q_bias"] == P(None, "model", None)
    assert layers["o"] == P(None, "model", None, None)
    assert layers["gate"] == layers["up"] == P(None, None, "model")
    assert layers["down"] == P(None, "model", None)
    # 2 kv-heads on a 4-way model axis: replicated by design, not split unevenly.
    for name in ("k", "v", "k_bias", "v_bias", "attn_norm", "mlp_norm"):
        assert all(axis is None for axis in layers[name]), (name, layers[name])
    assert all(axis is None for axis in spec["final_norm"])

    placed = jax.device_put(tiny["params"], shardings)
    L, D, N, K, H, F, V = 3, 64, 4, 2, 16, 96, 128
    assert _shard_shape(placed.embed) == (V // 4, D)
    assert _shard_shape(placed.lm_head) == (D, V // 4)
    assert _shard_shape(placed.layers.q) == (L, D, N // 4, H)
    assert _shard_shape(placed.layers.gate) == (L, D, F // 4)
    assert _shard_shape(placed.layers.k) == (L, D, K, H)  # whole on every device
    assert len(placed.embed.addressable_shards) == 8
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(tiny["params"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_kv_heads_split_where_the_axis_divides_them(tiny):
    """The replication of kv-heads above is the divisibility rule, not a missing rule."""
    mesh2 = sharding.make_mesh({"data": 4, "model": 2})
    assert weight_shardings(tiny["cfg"], mesh2).layers.k.spec == P(None, None, "model", None)
    mesh4 = sharding.make_mesh(MESHES["data2_model4"])
    axes = ("batch", "seq", "kv_heads", "head_dim")
    assert sharding.logical_to_spec(axes, mesh4, (BATCH, SEQ, 2, 16)) == P("data", None, None, None)
    assert sharding.logical_to_spec(axes, mesh2, (BATCH, SEQ, 2, 16)) == P("data", None, "model", None)


def test_fsdp_and_data_only_meshes(tiny):
    cfg = tiny["cfg"]
    fsdp = _spec(weight_shardings(cfg, sharding.make_mesh(MESHES["fsdp2_model4"])))
    assert fsdp["embed"] == P("model", "fsdp")
    assert fsdp["layers"]["q"] == P(None, "fsdp", "model", None)
    assert fsdp["layers"]["k"] == P(None, "fsdp", None, None)
    assert fsdp["layers"]["down"] == P(None, "model", "fsdp")
    data = _spec(weight_shardings(cfg, sharding.make_mesh(MESHES["data8"])))
    for leaf in jax.tree.leaves(data, is_leaf=lambda x: isinstance(x, P)):
        assert all(axis is None for axis in leaf), leaf  # pure data parallelism: weights replicated


def _place_batch(x, mesh):
    return jax.device_put(x, sharding.named_sharding(("batch", None), mesh, x.shape))


def _sharded_forward(tiny, mesh_shape):
    cfg, mesh = tiny["cfg"], sharding.make_mesh(mesh_shape)
    shardings = weight_shardings(cfg, mesh)
    params = jax.device_put(tiny["params"], shardings)
    tokens, mask = _place_batch(tiny["tokens"], mesh), _place_batch(tiny["mask"], mesh)
    batch_sharding = sharding.named_sharding(("batch", None), mesh, tokens.shape)
    assert tokens.sharding == batch_sharding
    out_sharding = sharding.named_sharding(("batch", "seq", "vocab"), mesh, (BATCH, SEQ, cfg.vocab_size))
    plan = sharding.MeshRules(mesh)  # explicit: a static argument, part of the trace key
    fn = jax.jit(lambda p, t, m: decoder.forward_logits(p, cfg, t, m, plan=plan),
                 in_shardings=(shardings, batch_sharding, batch_sharding), out_shardings=out_sharding)
    lowered = fn.lower(params, tokens, mask)
    out = lowered.compile()(params, tokens, mask)
    return mesh, lowered.as_text(), out, out_sharding


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_forward_equals_unsharded(tiny, mesh_name):
    mesh, text, out, out_sharding = _sharded_forward(tiny, MESHES[mesh_name])
    assert out.sharding == out_sharding
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    vocab_split = mesh.shape["model"]
    assert _shard_shape(out) == (BATCH // rows, SEQ, tiny["cfg"].vocab_size // vocab_split)
    np.testing.assert_allclose(np.asarray(out), tiny["ref"], **TOL)

    # Activation constraints are in the program (Shardy's sdy.sharding_constraint, the default lowering
    # of JAX 0.10 and 0.11): the residual stream batch-split, and on a model axis the q-heads split
    # while the 2 kv-heads stay whole.
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    batch_axes = "{" + ", ".join(f'"{a}"' for a in ("data", "fsdp") if mesh.shape[a] > 1) + "}"
    assert any(batch_axes in line and "x64xf32>" in line for line in constraints), constraints
    q_heads = [line for line in constraints if re.search(r"tensor<8x12x4x16xf32>", line)]
    kv_heads = [line for line in constraints if re.search(r"tensor<8x12x2x16xf32>", line)]
    assert q_heads and kv_heads
    if mesh.shape["model"] > 1:
        assert all('{"model"}' in line for line in q_heads)
    assert not any('"model"' in line for line in kv_heads)


def test_constraints_follow_the_mesh_not_the_first_trace(tiny):
    """A jitted engine function called outside any mesh, then inside JAX's mesh context, compiles a second,
    sharded program: the mesh is part of the trace key, never a hidden context that the jit cache misses."""
    cfg, mesh = tiny["cfg"], sharding.make_mesh(MESHES["data2_model4"])
    weights, tokens = tiny["params"], jax.numpy.asarray(tiny["tokens"])
    lens = jax.numpy.full((BATCH,), SEQ, jax.numpy.int32)
    gcfg = GenerateConfig(max_new_tokens=3)
    keys = row_keys(0, jax.numpy.arange(BATCH), 0)
    before = generate_tokens_jit._cache_size()
    plain = generate_tokens_jit(weights, cfg, gcfg, tokens, lens, keys)
    assert not isinstance(plain.tokens.sharding, NamedSharding) or plain.tokens.sharding.spec == P()
    placed = jax.device_put(weights, weight_shardings(cfg, mesh))
    with sharding.use_mesh(mesh):
        sharded = generate_tokens_jit(placed, cfg, gcfg, tokens, lens, keys)
    assert generate_tokens_jit._cache_size() == before + 2  # a second program, not the unsharded trace
    assert isinstance(sharded.tokens.sharding, NamedSharding)
    assert sharded.tokens.sharding.spec[0] == "data"  # the rows split over the data axis
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(plain.tokens))
    # The explicit form: the same function with a MeshRules static argument, outside any context.
    explicit = generate_tokens_jit(placed, cfg, gcfg, tokens, lens, keys, plan=sharding.MeshRules(mesh))
    assert explicit.tokens.sharding.spec == sharded.tokens.sharding.spec
    text = jax.jit(lambda w, t: decoder.forward_logits(w, cfg, t)).lower(weights, tokens).as_text()
    assert "sharding_constraint" not in text  # no mesh anywhere: no constraints


def test_load_hf_places_arrays_on_their_shardings(tiny):
    cfg, mesh = tiny["cfg"], sharding.make_mesh(MESHES["data2_model4"])
    shardings = weight_shardings(cfg, mesh)
    loaded_cfg, params = load_hf(tiny["dir"], shardings=shardings)
    assert loaded_cfg == cfg
    assert jax.tree.structure(params) == jax.tree.structure(shardings)
    for got, want, ref in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), jax.tree.leaves(tiny["params"])):
        assert isinstance(got.sharding, NamedSharding)
        assert got.sharding == want, (got.sharding, want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert _shard_shape(params.embed) == (cfg.vocab_size // 4, cfg.hidden_size)


def test_make_mesh_shapes():
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 4}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "model": 1}
    assert dict(sharding.make_mesh({"data": -1, "model": 2}).shape) == {"data": 4, "fsdp": 1, "model": 2}
    assert dict(sharding.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert dict(sharding.make_mesh({"model": 4}, devices=jax.devices()[:4]).shape)["model"] == 4
    # A mesh smaller than the host runs on its first devices.
    small = sharding.make_mesh({"data": 2, "model": 2})
    assert small.devices.size == 4 and list(small.devices.flat) == jax.devices()[:4]
    assert sharding.make_mesh({"data": 3}).devices.size == 3


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"data": 16}, "needs 16 devices, have 8"),
        ({"data": -1, "model": 3}, "8 devices cannot fill"),
        ({"data": -1, "model": -1}, "at most one mesh axis may be -1"),
        ({"tensor": 2}, r"unknown mesh axes \['tensor'\]"),
    ],
)
def test_make_mesh_errors_clearly(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_parse_mesh_flag():
    assert sharding.parse_mesh_flag("data=2,model=4") == {"data": 2, "model": 4}
    assert sharding.parse_mesh_flag(" data = 2 , model=4, ") == {"data": 2, "model": 4}
    assert sharding.parse_mesh_flag("data=-1") == {"data": -1}
    assert dict(sharding.make_mesh(sharding.parse_mesh_flag("data=2,model=4")).shape) == {
        "data": 2, "fsdp": 1, "model": 4}
    with pytest.raises(ValueError, match="expected name=size"):
        sharding.parse_mesh_flag("data")
    with pytest.raises(ValueError):
        sharding.parse_mesh_flag("data=two")
