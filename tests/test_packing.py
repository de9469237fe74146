"""PackedVariables: exact round trips, layout checks, and a QAT step that carries its observer
state packed and trains bit for bit as the one that carries the tree."""

import functools
import os
import tempfile

import chex
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
import qjax.nn as qnn
from qjax.nn import PackedVariables

DTYPES = (np.float32, np.int32, np.int8, np.uint8, np.float16, jnp.bfloat16)


def _stats():
  return {"fc1": {"input": {"count": jnp.int32(3), "max_val": jnp.float32(2.5),
                            "min_val": jnp.float32(-1.0), "skipped": jnp.int32(0)},
                  "weight": {"count": jnp.int32(3), "max_val": jnp.arange(4.0),
                             "min_val": -jnp.arange(4.0), "skipped": jnp.int32(1)}},
          "fc2": {"weight": {"min_val": jnp.zeros((2, 0)), "max_val": jnp.ones((2, 3))}}}


def _assert_same_tree(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@st.composite
def _trees(draw):
  n = draw(st.integers(0, 6))
  tree = {}
  for i in range(n):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    # Raw bit patterns: NaN payloads, infinities and -0.0 must survive the trip too.
    bits = draw(hnp.arrays(np.uint8, (int(np.prod(shape)) * np.dtype(dtype).itemsize,)))
    tree[f"leaf{i}"] = jnp.asarray(bits.view(dtype).reshape(shape))
  return tree


class PackedVariablesTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_round_trip_is_exact(self):
    stats = _stats()
    packed = self.variant(PackedVariables.pack)(stats)
    _assert_same_tree(self.variant(lambda p: p.unpack())(packed), stats)

  def test_one_buffer_per_dtype_in_order_of_first_appearance(self):
    packed = PackedVariables.pack(_stats())
    self.assertEqual([(b.dtype, b.shape) for b in packed.buffers],
                     [(jnp.int32, (4,)), (jnp.float32, (2 + 8 + 0 + 6,))])
    self.assertEqual(packed.num_leaves, 10)
    self.assertEqual(len(jax.tree_util.tree_leaves(packed)), 2)
    self.assertEqual(repr(packed), "PackedVariables(10 leaves in int32[4], float32[16])")

  def test_empty_tree(self):
    packed = PackedVariables.pack({})
    self.assertEqual(packed.buffers, ())
    self.assertEqual(packed.unpack(), {})
    self.assertEqual(jax.jit(lambda p: p.repack(p.unpack()))(packed).unpack(), {})

  @settings(max_examples=60, deadline=None)
  @given(_trees())
  def test_bit_patterns_survive_pack_and_repack(self, tree):
    packed = PackedVariables.pack(tree)
    as_bits = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: np.asarray(x).reshape(-1).view(np.uint8), t)
    _assert_same_tree(as_bits(packed.unpack()), as_bits(tree))
    _assert_same_tree(as_bits(packed.repack(tree).unpack()), as_bits(tree))

  @chex.variants(with_jit=True, without_jit=True)
  def test_repack_writes_the_updated_values_into_the_same_layout(self):
    stats = _stats()
    packed = PackedVariables.pack(stats)
    updated = jax.tree_util.tree_map(lambda x: x + jnp.ones((), x.dtype), stats)
    repacked = self.variant(lambda p, t: p.repack(t))(packed, updated)
    self.assertEqual(jax.tree_util.tree_structure(repacked),
                     jax.tree_util.tree_structure(packed))
    _assert_same_tree(repacked.unpack(), updated)

  def test_repack_refuses_another_structure_shape_or_dtype(self):
    stats = _stats()
    packed = PackedVariables.pack(stats)
    with self.assertRaisesRegex(ValueError, "expected a tree of structure"):
      packed.repack({**stats, "fc3": jnp.zeros(2)})
    wider = jax.tree_util.tree_map(lambda x: x, stats)
    wider["fc1"]["weight"]["max_val"] = jnp.arange(5.0)
    with self.assertRaisesRegex(
        ValueError, r"\['fc1'\]\['weight'\]\['max_val'\] must be float32\[4\].*got float32\[5\]"):
      packed.repack(wider)
    recast = jax.tree_util.tree_map(lambda x: x, stats)
    recast["fc1"]["input"]["count"] = jnp.float32(3)
    with self.assertRaisesRegex(ValueError, r"\['count'\] must be int32\[\].*got float32\[\]"):
      packed.repack(recast)

  def test_a_leaf_that_is_not_an_array_is_named(self):
    with self.assertRaisesRegex(TypeError, r"leaf at \['b'\] is float"):
      PackedVariables.pack({"a": jnp.zeros(2), "b": 1.5})

  def test_io_asks_for_the_tree(self):
    with self.assertRaisesRegex(TypeError, r"leaf at stats is a qjax.nn.PackedVariables.*"
                                           r"packed.unpack\(\)"):
      qjax.io.save(os.path.join(tempfile.mkdtemp(), "stats.qjax"),
                   {"stats": PackedVariables.pack(_stats())})

  def test_a_jitted_step_traces_once_and_takes_the_buffers_donated(self):
    step = jax.jit(chex.assert_max_traces(
        lambda p: p.repack(jax.tree_util.tree_map(lambda x: x * 2, p.unpack())), n=1),
        donate_argnums=0)
    packed = PackedVariables.pack(_stats())
    for _ in range(3):
      old = packed.buffers
      packed = step(packed)
      self.assertTrue(all(b.is_deleted() for b in old))
    self.assertEqual(int(packed.unpack()["fc1"]["input"]["count"]), 3 * 8)


class _MLP(nn.Module):
  int8_forward: bool = False

  @nn.compact
  def __call__(self, x):
    qconfig = qnn.get_default_qat_qconfig("x86")
    dot = functools.partial(qnn.QuantDotGeneral, qconfig=qconfig, mode="qat",
                            int8_forward=self.int8_forward)
    x = nn.relu(nn.Dense(16, dot_general_cls=dot)(x))
    return nn.Dense(4, dot_general_cls=dot)(x)


@pytest.mark.parametrize("int8_forward", [False, True])
def test_qat_steps_with_packed_observer_state_match_the_tree_carry(int8_forward):
  model, optimizer = _MLP(int8_forward=int8_forward), optax.sgd(0.05, momentum=0.9)
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.standard_normal((3, 8, 12)).astype(np.float32))
  ys = jnp.asarray(rng.integers(0, 4, (3, 8)))
  variables = model.init(jax.random.PRNGKey(0), xs[0])

  def train(params, stats, opt_state, x, y, *, packed):
    def loss_fn(params):
      tree = stats.unpack() if packed else stats
      logits, updates = model.apply({"params": params, qnn.STATS: tree}, x, mutable=[qnn.STATS])
      loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1).mean()
      return loss, updates[qnn.STATS]
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    new = stats.repack(new) if packed else new
    return optax.apply_updates(params, updates), new, opt_state, loss

  results = []
  for packed in (False, True):
    step = jax.jit(functools.partial(train, packed=packed), donate_argnums=(0, 1, 2))
    params = jax.tree_util.tree_map(jnp.copy, variables["params"])
    stats = jax.tree_util.tree_map(jnp.copy, variables[qnn.STATS])
    if packed:
      stats = PackedVariables.pack(stats)
      assert len(jax.tree_util.tree_leaves(stats)) == 2  # int32 and float32
    opt_state = optimizer.init(params)
    for x, y in zip(xs, ys):
      params, stats, opt_state, _ = step(params, stats, opt_state, x, y)
    results.append((params, stats.unpack() if packed else stats))
  _assert_same_tree(results[1], results[0])
  assert int(results[1][1]["Dense_0"]["input"]["count"]) == 3  # the observers did run


if __name__ == "__main__":
  pytest.main([__file__])
