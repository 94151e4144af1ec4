"""jquant.blockpass: the block walk GPTQ and block-wise reconstruction share (their tests run it end to end)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import jquant
from jquant import blockpass

SPEC = jquant.QuantSpec(bits=4)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.Dense(16, name=f"layers_{i}")(x)
    return nn.Dense(8, name="head")(x)


def test_rules_matching_no_parameter_are_named():
  paths = ["layers_0/up/kernel", "layers_0/down/kernel", "layers_0/norm/scale"]
  blockpass.check_rules_match([jquant.Rule("kernel", SPEC), jquant.Rule("norm", None)], paths, "f")
  rules = [jquant.Rule("kernel", SPEC), jquant.Rule("q_proj", SPEC), jquant.Rule("lm_head", None)]
  with pytest.raises(ValueError, match=r"^f: rules\[1\] \(pattern 'q_proj', nearest paths \[.*\]\); rules\[2\] "
                                       r"\(pattern 'lm_head', .*\) match no parameter of the model; allowed: .* "
                                       r"such as 'layers_0/up/kernel'\. Fix the pattern or drop the rule\.$"):
    blockpass.check_rules_match(rules, paths, "f")
  with pytest.raises(TypeError, match=r"f: rules must be jquant.Rule objects, got tuple"):
    blockpass.check_rules([("kernel", SPEC)], "f")


def test_model_params_unwraps_linen_variables_and_refuses_none():
  x = np.ones((2, 4, 16), np.float32)
  variables = _Net().init(jax.random.key(0), x)
  _, params, wrapped = blockpass.model_params(_Net(), variables, "f")
  assert wrapped and params is variables["params"]
  _, params, wrapped = blockpass.model_params(_Net(), variables["params"], "f")
  assert not wrapped and params is variables["params"]
  with pytest.raises(ValueError, match=r"f: params=None, but _Net holds no parameters; pass the float parameter"):
    blockpass.model_params(_Net(), None, "f")


def test_targets_per_block_and_the_rest_rounded_to_nearest():
  x = jax.random.normal(jax.random.key(1), (2, 4, 16))
  net = _Net()
  apply, params, _ = blockpass.model_params(net, net.init(jax.random.key(2), x), "f")
  runs = blockpass.Runs(net, apply, params, [(x,)], None)
  flat, treedef = runs.flat(params)
  states = runs.prefix(flat, [(x,)])
  rules = [jquant.Rule("layers_1", None), jquant.Rule("kernel", SPEC)]
  found: dict = {}
  got = []
  for i, seg in enumerate(runs.main.prog.block_segments):
    targets, groups = runs.targets(seg, flat, states[0], rules, found)
    got.append({r: (t[0], t[2]) for r, t in targets.items()})
    states = runs.forward(i, flat, states)
  # Block 1's kernel is kept float by the first rule; the head is no block's. Nothing was solved here, so
  # round_the_rest rounds every selected float leaf: the head along the axes read from the whole model.
  assert got == [{"kernel": ("layers_0/kernel", (0,))}, {}]
  assert found == {"layers_0/kernel": (0,), "layers_1/kernel": (0,)}
  out = jax.tree_util.tree_unflatten(treedef, [flat[p] for p in runs.main.prog.param_paths])
  out, rest = blockpass.round_the_rest(out, dict(flat), rules, found, apply, params, (x,))
  assert rest == ("head/kernel", "layers_0/kernel")
  assert jquant.is_qarray(out["head"]["kernel"]) and not jquant.is_qarray(out["layers_1"]["kernel"])
  np.testing.assert_array_equal(np.asarray(out["head"]["kernel"].codes()),
                                np.asarray(jquant.quantize(params["head"]["kernel"], SPEC).codes()))
