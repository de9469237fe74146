"""QArray: pytree structure, invariants and their validator, jit / vmap round trips."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QArray, QParams, QuantSpec
from qjax import numerics, qarray

RNG = np.random.default_rng(7)
X = jnp.asarray(RNG.standard_normal((5, 4)).astype(np.float32))


def _qarray(spec=QuantSpec(bits=8, axis=1, symmetric=True)):
  return qarray.quantize_array(X, spec)


class QArrayTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_quantize_array_matches_numerics(self):
    for spec in (QuantSpec(bits=8), QuantSpec(bits=4, signed=False, axis=0),
                 QuantSpec(bits=12, symmetric=True, axis=-1)):
      qa = self.variant(qarray.quantize_array, static_argnums=1)(X, spec)
      qp = numerics.qparams_from_minmax(*numerics.minmax(X, spec), spec)
      np.testing.assert_array_equal(qa.qvalue, numerics.quantize(X, spec, qp))
      np.testing.assert_array_equal(qa.scale, qp.scale)
      np.testing.assert_array_equal(qa.zero_point, qp.zero_point)
      self.assertEqual(qa.qvalue.dtype, spec.storage_dtype)
      np.testing.assert_array_equal(qa.dequantize(), numerics.dequantize(qa.qvalue, spec, qp))

  @chex.variants(with_jit=True, without_jit=True)
  def test_dequantize_method(self):
    qa = _qarray()
    out = self.variant(lambda q: q.dequantize(jnp.bfloat16))(qa)
    self.assertEqual(out.dtype, jnp.bfloat16)
    np.testing.assert_array_equal(out, qa.dequantize().astype(jnp.bfloat16))

  def test_explicit_qparams(self):
    spec = QuantSpec(bits=8, signed=False)
    qa = qarray.quantize_array(X, spec, qparams=QParams(jnp.float32(0.05), jnp.int32(100)))
    self.assertEqual(float(qa.scale), np.float32(0.05))
    self.assertEqual(int(qa.zero_point), 100)

  def test_pytree_leaves_keys_and_static_spec(self):
    qa = _qarray()
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    self.assertLen(leaves, 3)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qa)[0]]
    self.assertEqual(paths, [".qvalue", ".scale", ".zero_point"])
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    self.assertEqual(rebuilt.spec, qa.spec)
    # A different spec is a different treedef: jit retraces instead of mixing grids.
    other = qarray.quantize_array(X, QuantSpec(bits=8, axis=1, symmetric=True, narrow_range=True))
    self.assertNotEqual(jax.tree_util.tree_structure(other), treedef)

  def test_jit_roundtrip_and_vmap(self):
    qa = _qarray(QuantSpec(bits=8, axis=0))
    passed = jax.jit(lambda q: q)(qa)
    self.assertIsInstance(passed, QArray)
    np.testing.assert_array_equal(passed.qvalue, qa.qvalue)
    # vmap over rows of a per-row (axis=0) QArray: each row is per-tensor of its own.
    row_values = jax.vmap(lambda v, s, z: numerics.dequantize(v, QuantSpec(bits=8),
                                                              QParams(s, z)))(
        qa.qvalue, qa.scale, qa.zero_point)
    np.testing.assert_array_equal(row_values, qa.dequantize())

  def test_tree_map_over_nested_params(self):
    params = {"dense": {"kernel": _qarray(), "bias": jnp.zeros(4)}}
    sizes = jax.tree_util.tree_map(lambda v: v.nbytes if isinstance(v, QArray) else v.size * 4,
                                   params, is_leaf=qarray.is_qarray)
    self.assertEqual(sizes["dense"]["kernel"], 20 + 4 * 4 + 4 * 4)


@pytest.mark.parametrize("build,error,match", [
    (lambda qa: QArray(qa.qvalue.astype(jnp.int16), qa.scale, qa.zero_point, qa.spec),
     TypeError, "qvalue must have dtype int8"),
    (lambda qa: QArray(qa.qvalue, qa.scale.astype(jnp.float16), qa.zero_point, qa.spec),
     TypeError, "scale must be float32"),
    (lambda qa: QArray(qa.qvalue, qa.scale, qa.zero_point.astype(jnp.int8), qa.spec),
     TypeError, "zero_point must be int32"),
    (lambda qa: QArray(qa.qvalue, qa.scale[:3], qa.zero_point, qa.spec),
     ValueError, r"QArray\.scale has shape \(3,\), but the spec is per-channel along axis 1 and qvalue "
     r"has shape \(5, 4\), so it must have shape \(4,\)\."),
    (lambda qa: QArray(qa.qvalue, qa.scale, qa.zero_point, QuantSpec(bits=8, axis=2,
                                                                     symmetric=True)),
     ValueError, "axis=2 is out of range"),
    (lambda qa: QArray(qa.qvalue, -qa.scale, qa.zero_point, qa.spec),
     ValueError, "scale must be finite and > 0"),
    (lambda qa: QArray(qa.qvalue, qa.scale, qa.zero_point + 1, qa.spec),
     ValueError, "zero_point must be 0 for the symmetric"),
    (lambda qa: QArray(qa.qvalue, qa.scale, qa.zero_point + 500,
                       QuantSpec(bits=8, axis=1)), ValueError, r"QArray\.zero_point must lie in \[qmin, qmax\] = \[-128, 127\]"),
    (lambda qa: QArray(jnp.full((5, 4), -128, jnp.int8), qa.scale, qa.zero_point,
                       QuantSpec(bits=8, axis=1, symmetric=True, narrow_range=True)),
     ValueError, r"QArray\.qvalue holds values in \[-128, -128\], outside the grid "
     r"\[qmin, qmax\] = \[-127, 127\]"),
    (lambda qa: QArray(qa.qvalue, qa.scale, qa.zero_point, "int8"), TypeError,
     "spec must be a qjax.QuantSpec"),
    (lambda qa: QArray(np.asarray(qa.qvalue).tolist(), qa.scale, qa.zero_point, qa.spec),
     TypeError, "qvalue must be an array"),
])
def test_invariants_are_validated(build, error, match):
  with pytest.raises(error, match=match):
    build(_qarray())


def test_quantize_array_rejects_integer_input():
  with pytest.raises(TypeError, match="x must be a floating-point array"):
    qarray.quantize_array(jnp.arange(4), QuantSpec())
