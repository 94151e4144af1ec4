"""Rotations of a model's activations (QuaRot / SpinQuant style), folded exactly into its weights.

* `hadamard`: Hadamard and randomised Hadamard rotations of sizes ``p * 2^j``
  (Paley factor times Walsh-Hadamard), a random orthogonal factor elsewhere,
  and their fast transform.
* `core`: the math on weights (``Q^T W`` readers, ``W Q`` writers, norm
  scales folded first).
* `online`: `OnlineRotation`, the leaf that rotates a matmul's input in the
  forward pass (the MLP down projection).
* `model`: `derive_plan` / `rotate`: a whole model, found from its traced
  program and checked against the float model.
"""

from jquant.rotation.hadamard import Rotation, RotationError, hadamard, has_hadamard
from jquant.rotation.model import (DEFAULT_RTOL, HeadPair, Plan, Rotated, RotatedModel, RotationConfig, Writer,
                                   derive_plan, rotate, untie_embeddings)
from jquant.rotation.online import OnlineRotation
from jquant.rotation import core

__all__ = ["Rotation", "RotationError", "hadamard", "has_hadamard", "OnlineRotation", "RotationConfig", "Plan",
           "Writer", "HeadPair", "Rotated", "RotatedModel", "derive_plan", "rotate", "untie_embeddings", "core",
           "DEFAULT_RTOL"]
