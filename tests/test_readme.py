"""The README's quickstart runs exactly as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(section: str):
  text = open(os.path.join(ROOT, "README.md")).read()
  m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text + "\n## END", re.S | re.M)
  assert m, f"README has no '## {section}' section"
  return re.findall(r"```python\n(.*?)```", m.group(1), re.S)


def test_quickstart_runs_as_written():
  blocks = _python_blocks("Quickstart")
  assert blocks, "the quickstart has no python block"
  scope = {}
  exec(compile(blocks[0], "README quickstart", "exec"), scope)
  assert scope["q"].qvalue.shape == (256, 256)
  # The default symmetric_scale="signed": half a step, or up to one step at the clipped far end of the other sign.
  assert float(scope["err"]) <= float(abs(scope["q"].scale).max()) * 1.0001
  assert scope["y"].shape == (2, 256)


def _run_section(section: str, tmp_path, monkeypatch) -> dict:
  blocks = _python_blocks(section)
  assert len(blocks) == 1, f"README section {section!r} should hold one python example, has {len(blocks)}"
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(blocks[0], f"README {section}", "exec"), scope)
  return scope


def test_gptq_example_runs(tmp_path, monkeypatch):
  import jquant
  import jax
  s = _run_section("GPTQ (`jquant.gptq`)", tmp_path, monkeypatch)
  k = s["qparams"]["layers_0"]["down"]["kernel"]
  assert isinstance(k, jquant.QArray) and k.bits == 4
  assert s["report"].total_loss < s["report"].total_rtn_loss and len(s["report"].layers) == 4
  assert s["logits"].shape == (8, 64, 256)
  q = [v for v in jax.tree_util.tree_leaves(s["qstate"], is_leaf=lambda v: isinstance(v, jquant.QArray))
       if isinstance(v, jquant.QArray)]
  assert len(q) == 2 and s["y"].shape == (8, 16, 64)


def test_awq_example_runs(tmp_path, monkeypatch):
  import jax.numpy as jnp
  s = _run_section("AWQ: activation-aware scaling and clipping (`jquant.awq`)", tmp_path, monkeypatch)
  run, calib, ref = s["run"], s["calib"], s["ref"]
  mse = lambda p: float(jnp.mean((run({"params": p}, calib) - ref) ** 2))
  assert mse(s["qparams"]) < mse(s["rtn"])  # AWQ beats RTN here
  assert [f.kind for f in s["scaled"].folds[:4]] == ["norm_scale", "linear", "norm_scale", "linear"]


def test_w8a8_example_runs(tmp_path, monkeypatch):
  from jquant.ops import W8A8Weight
  s = _run_section("W8A8: dynamic and static INT8 activations, observers, SmoothQuant", tmp_path, monkeypatch)
  assert isinstance(s["served"]["layers_0"]["attn"]["q"]["kernel"], W8A8Weight)
  assert s["fq"].total_bytes < 0.5 * s["fp"].total_bytes


def test_qat_example_runs(tmp_path, monkeypatch):
  s = _run_section("Quantization-aware training (`jquant.qat`)", tmp_path, monkeypatch)
  assert s["log"].losses[-1] < s["log"].losses[0]


def test_models_example_runs(tmp_path, monkeypatch, capsys):
  s = _run_section("Models, data and evaluation", tmp_path, monkeypatch)
  assert s["ppl"] < 30 and s["n"] == 4 * 255
  assert capsys.readouterr().out.startswith(" Paris")


def test_export_example_runs(tmp_path, monkeypatch):
  s = _run_section("Exporting quantized models (`jquant.export`)", tmp_path, monkeypatch)
  assert s["same"] and s["exp"].platforms == ("cpu", "tpu", "cuda")


def test_any_model_example_runs(tmp_path, monkeypatch):
  import jquant
  s = _run_section("Any model: your own Linen or NNX transformer (`jquant.quantized`)", tmp_path, monkeypatch)
  assert s["axes"]["layers_0/o/kernel"] == (0, 1) and s["axes"]["layers_0/v/kernel"] == (1,)
  assert isinstance(s["qparams"]["layers_1"]["o"]["kernel"], jquant.QArray)
  assert float(abs(s["logits"] - s["ref"]).max()) < 1e-4
  assert s["y"].shape == (4, 128)


def test_gguf_example_runs(tmp_path, monkeypatch):
  s = _run_section("GGUF both ways (`jquant.gguf`)", tmp_path, monkeypatch)
  assert s["report"].type_counts() == {"Q4_K": 15, "F32": 5} and s["same"]
  assert (tmp_path / "toy-q4_k.gguf").is_file()


def test_mixed_precision_example_runs(tmp_path, monkeypatch):
  import jquant
  s = _run_section("Mixed precision under a size budget (`jquant.mixed`)", tmp_path, monkeypatch)
  alloc, q = s["alloc"], s["q"]
  assert len(alloc.choices) == 14 and alloc.nbytes <= alloc.budget and alloc.bound == alloc.damage
  q_bytes = sum(l.nbytes for l in jquant.footprint(q).leaves if l.kind.startswith("int"))
  assert q_bytes == alloc.nbytes
  written = s["report"].type_counts()  # every chosen type reaches the file; norms and the embedding stay F32
  counts = alloc.counts()
  assert {t: written[t] for t in counts} == counts and set(written) - set(counts) == {"F32"}
  assert (tmp_path / "mixed.gguf").is_file()


def test_kv_cache_generation_example_runs(tmp_path, monkeypatch):
  s = _run_section("Generation with a KV cache (`jquant.generate`, `jquant.kvcache`)", tmp_path, monkeypatch)
  assert s["out"].tokens.shape == (2, 8) and s["logits"].shape == (2, 256)
  from jquant import kvcache
  c = s["m"].config  # 2 rows, 4 + 8 tokens, KIVI int4 keys in blocks of 8: 16 slots
  assert s["out"].cache_bytes == kvcache.cache_bytes(s["kivi"], n_layers=c.n_layers, batch=2, max_len=16,
                                                     n_kv_heads=c.n_kv_heads, head_dim=c.dim // c.n_heads)


def test_sharding_example_runs(tmp_path, monkeypatch):
  import jax
  s = _run_section("Models larger than one device (`jquant.sharding`)", tmp_path, monkeypatch)
  k = s["q"]["layers_0"]["mlp"]["gate"]["kernel"]
  assert k.qvalue.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(k.qvalue.sharding.device_set) == 8
