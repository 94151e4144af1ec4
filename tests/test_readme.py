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
  assert float(scope["err"]) <= float(scope["q"].scale.max()) / 2 * 1.0001
  assert scope["y"].shape == (2, 256)
