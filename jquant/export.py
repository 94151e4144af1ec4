"""Shipping quantized models with `jax.export`: one artifact for CPU, TPU and CUDA.

`jax.export` is how a model quantized on one host reaches a TPU or GPU
server. This module makes jquant's pytrees (`QArray`, `W8A8Weight`, QAT's
`Quantizer`, `ActFakeQuant`, `ActQuantWeight`, `QATState`) serializable in an
``Exported``'s input and output trees (registered when `jquant` is imported),
and `export` wraps `jax.export.export` with what a quantized model needs:

* every platform of ``platforms`` lowers only its own kernels (Pallas Mosaic
  for TPU, Pallas Triton for CUDA, XLA for CPU), so one export carries all
  three (see `pallas_kernels._common.platform_switch`);
* the Triton custom call, which has no cross-version compatibility guarantee,
  is allowed: load the artifact with the same jax/jaxlib version (the TPU
  Mosaic call is covered by JAX's usual compatibility window);
* symbolic batch and sequence dimensions (``jax.export.symbolic_shape``) pass
  through the kernel wrappers: the TPU kernels pad to block multiples with
  symbolic shapes; Triton has no dynamic grids, so the CUDA lowering of a
  symbolic-M product uses XLA (dequantize, then a GEMM).

Example:
    >>> import jax, jax.numpy as jnp, jquant
    >>> w = jax.random.normal(jax.random.key(0), (256, 128))
    >>> q = jquant.quantize(w, jquant.QuantSpec(bits=4, granularity="group", group_size=128))
    >>> b, = jax.export.symbolic_shape("b")
    >>> exp = jquant.export.export(jquant.ops.qdot)(jax.ShapeDtypeStruct((b, 256), jnp.float32), q)
    >>> exp.platforms
    ('cpu', 'tpu', 'cuda')
    >>> restored = jquant.export.deserialize(exp.serialize())
    >>> restored.call(jnp.ones((3, 256)), q).shape
    (3, 128)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax import export as jax_export

from jquant.spec import QuantSpec

TRITON_CALL = "__gpu$xla.gpu.triton"
PLATFORMS = ("cpu", "tpu", "cuda")


# ---------------------------------------------------------------------------
# Auxiliary data as JSON: specs by class name, dtypes by name, tuples tagged.


def _spec_classes() -> dict:
  from jquant.calibrate import W8A8Spec  # late: calibrate imports much of jquant
  return {"QuantSpec": QuantSpec, "W8A8Spec": W8A8Spec}


def _encode(obj):
  if isinstance(obj, QuantSpec):
    fields = {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return {"__spec__": type(obj).__name__, "fields": fields}
  if isinstance(obj, (np.dtype, type)) and obj is not bool:
    return {"__dtype__": np.dtype(obj).name}
  if isinstance(obj, tuple):
    return {"__tuple__": [_encode(x) for x in obj]}
  if isinstance(obj, list):
    return [_encode(x) for x in obj]
  if isinstance(obj, (np.integer, np.floating, np.bool_)):
    return obj.item()
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  raise TypeError(f"jquant.export: cannot serialize auxiliary data of type {type(obj).__name__}: {obj!r}.")


def _decode(obj):
  if isinstance(obj, list):
    return [_decode(x) for x in obj]
  if not isinstance(obj, dict):
    return obj
  if "__tuple__" in obj:
    return tuple(_decode(x) for x in obj["__tuple__"])
  if "__dtype__" in obj:
    return np.dtype(obj["__dtype__"]) if obj["__dtype__"] != "bfloat16" else np.dtype(jax.numpy.bfloat16)
  if "__spec__" in obj:
    classes = _spec_classes()
    if obj["__spec__"] not in classes:
      raise ValueError(f"jquant.export: unknown spec class {obj['__spec__']!r}; known: {tuple(classes)}.")
    return classes[obj["__spec__"]](**{k: _decode(v) for k, v in obj["fields"].items()})
  return {k: _decode(v) for k, v in obj.items()}


def serialize_aux(aux) -> bytes:
  """Pytree auxiliary data (specs, ints, dtypes, tuples) as JSON bytes."""
  return json.dumps(_encode(aux), sort_keys=True).encode()


def deserialize_aux(data: bytes):
  """Inverse of `serialize_aux`."""
  return _decode(json.loads(data.decode()))


_REGISTERED = False


def register_serialization() -> None:
  """Registers jquant's pytree types with `jax.export` (idempotent; done on ``import jquant``)."""
  global _REGISTERED
  if _REGISTERED:
    return
  from jquant.ops import W8A8Weight
  from jquant.qarray import QArray
  from jquant import qat

  for cls in (QArray, W8A8Weight, qat.Quantizer, qat.ActFakeQuant, qat.ActQuantWeight):
    jax_export.register_pytree_node_serialization(
        cls, serialized_name=f"jquant.{cls.__name__}", serialize_auxdata=serialize_aux,
        deserialize_auxdata=deserialize_aux)
  for cls in (qat.QATState,):
    jax_export.register_namedtuple_serialization(cls, serialized_name=f"jquant.{cls.__name__}")
  _REGISTERED = True


# ---------------------------------------------------------------------------
# Export.


def export(fn: Callable, *, platforms: Sequence[str] = PLATFORMS, disabled_checks: Sequence[Any] = (),
           **kwargs) -> Callable[..., jax_export.Exported]:
  """`jax.export.export` for functions over quantized trees, for several platforms at once.

  Args:
    fn: The function (jitted or not), e.g. ``model.apply``.
    platforms: Lowering platforms, any of ``("cpu", "tpu", "cuda", "rocm")``;
      default all of ``PLATFORMS``. Kernels are emitted per platform.
    disabled_checks: More `jax.export.DisabledSafetyCheck`s; the Triton custom
      call is always allowed.
    **kwargs: Passed to `jax.export.export`.

  Returns:
    A function of ``*args`` (arrays, `jax.ShapeDtypeStruct`s with symbolic
    dims, or quantized trees) returning the `jax.export.Exported`.

  Raises:
    ValueError: An unknown platform.
  """
  platforms = tuple(platforms)
  allowed = ("cpu", "tpu", "cuda", "rocm")
  bad = [p for p in platforms if p not in allowed]
  if bad or not platforms:
    raise ValueError(f"jquant.export: platforms={platforms!r}; allowed: a non-empty subset of {allowed}.")
  register_serialization()
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  checks = [jax_export.DisabledSafetyCheck.custom_call(TRITON_CALL), *disabled_checks]
  return jax_export.export(jitted, platforms=platforms, disabled_checks=checks, **kwargs)


def deserialize(data: bytes | bytearray) -> jax_export.Exported:
  """`jax.export.deserialize` with jquant's pytree types registered."""
  register_serialization()
  return jax_export.deserialize(bytearray(data))


__all__ = ["export", "deserialize", "register_serialization", "serialize_aux", "deserialize_aux",
           "PLATFORMS", "TRITON_CALL"]
