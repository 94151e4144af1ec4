"""jquant.dataflow: a block's program flattened, its matmul sites and groups, attention-score detection, slices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fold_models as M
from jquant import capture, dataflow, graph


@pytest.fixture(scope="module")
def block():
  m = M.LinenLlama()
  tok = M.tokens(2, 8)
  params = M.init(m, tok)
  apply = lambda p, t: m.apply({"params": p}, t)
  prog = graph.trace(apply, params, tok)
  seg = prog.block_segments[0]
  by_path = dict(zip(prog.param_paths, graph._flat_params(params)))
  bp = prog.block_params(by_path, seg)
  state = graph.state_list(seg, prog.prefix(params, tok))
  return dataflow.segment_flat(prog, seg), bp, state


def test_sites_groups_axes_and_score_detection(block):
  flat, _, _ = block
  sites = {s.param: s for s in flat.sites}
  assert list(sites) == ["q/kernel", "k/kernel", "v/kernel", "o/kernel", "gate/kernel", "up/kernel", "down/kernel"]
  assert sites["o/kernel"].w_axes == (0, 1) and sites["q/kernel"].w_axes == (0,)
  groups = [tuple(flat.sites[i].param.split("/")[0] for i in g) for g in flat.groups]
  assert groups == [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]
  # Queries and keys meet in the scores over their last (head) axis; values are contracted over positions.
  scores = {s.param.split("/")[0] for i, s in enumerate(flat.sites) if flat.feeds_scores(i)}
  assert scores == {"q", "k"}


def test_flat_run_equals_segment_and_canonical_inputs_equal_capture(block):
  flat, bp, state = block
  names = [flat.params[v] for v in flat.invars[:len(flat.params)]]
  inputs = [bp[n] for n in names] + list(state)
  outs = flat.run(inputs)
  xs = flat.run(inputs, [s.x for s in flat.sites])
  # The same block through jquant.capture (the interpreter every solver records with).
  fn = lambda p, *st: flat.run([p[n] for n in names] + list(st))
  got_out, got_xs = capture.capture_inputs(fn, bp, *state)
  for a, b in zip(outs, got_out):
    np.testing.assert_array_equal(a, b)
  for s, x in zip(flat.sites, xs):
    np.testing.assert_array_equal(dataflow.canonical(x, s.x_dims), got_xs[s.param])


def test_slice_recomputes_targets_from_recorded_frontier(block):
  flat, bp, state = block
  names = [flat.params[v] for v in flat.invars[:len(flat.params)]]
  g = flat.groups[0]                                  # q, k, v
  o = next(s for s in flat.sites if s.param == "o/kernel")
  changed = [flat.invars[flat.param_index[flat.sites[i].param]] for i in g]
  sl = flat.slice(changed, [o.out])
  assert len(sl.eqns) < len(flat.eqns) // 2          # the MLP half of the block is not re-run
  inputs = [bp[n] for n in names] + list(state)
  frontier = flat.run(inputs, list(sl.frontier))
  new = {flat.sites[i].param: 0.5 * bp[flat.sites[i].param] for i in g}
  (got,) = sl.run([new[flat.sites[i].param] for i in g], frontier)
  (want,) = flat.run([new.get(n, bp[n]) for n in names] + list(state), [o.out])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(got, flat.run(inputs, [o.out])[0])


def test_programs_per_batch_shape():
  m = M.LinenLlama()
  tok = M.tokens(5, 8)
  params = M.init(m, tok)
  progs = dataflow.Programs(lambda p, t: m.apply({"params": p}, t), params)
  a, b, c = progs((tok[:4],)), progs((tok[4:],)), progs((tok[:4],))
  assert a is c and a is not b
  assert [s.name for s in a.block_segments] == [s.name for s in b.block_segments] == ["layers_0", "layers_1"]
