"""Measured bits per weight of a 4096x4096 kernel, next to the ideal of each layout.

Ideal = code bits + (scale bits [+ zero-point bits]) / group size. Writes
``experiments/results/bits_per_weight.md``.
"""

import os

import jax

import jquant

CASES = [
    ("W8 per-channel", jquant.QuantSpec(bits=8, granularity="channel")),
    ("W4 g128 sym", jquant.QuantSpec(bits=4, granularity="group", group_size=128)),
    ("W4 g128 asym", jquant.QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)),
    ("W3 g128 sym", jquant.QuantSpec(bits=3, granularity="group", group_size=128)),
    ("W3 g128 asym", jquant.QuantSpec(bits=3, symmetric=False, granularity="group", group_size=128)),
    ("W2 g64 asym", jquant.QuantSpec(bits=2, symmetric=False, granularity="group", group_size=64)),
    ("W4 g128 sym, bf16 scales", jquant.QuantSpec(bits=4, granularity="group", group_size=128,
                                                   scale_dtype="bfloat16")),
]


def main():
  w = jax.random.normal(jax.random.key(0), (4096, 4096))
  lines = ["| layout | payload bytes | total bytes | measured bits/w | ideal bits/w |", "|---|---|---|---|---|"]
  for name, spec in CASES:
    q = jquant.quantize(w, spec)
    group = 4096 if spec.granularity == "channel" else spec.group_size
    scale_bits = 16 if spec.scale_dtype == "bfloat16" else 32
    ideal = spec.bits + (scale_bits + (0 if spec.symmetric else 8)) / group
    measured = 8 * q.nbytes / w.size
    lines.append(f"| {name} | {q.qvalue.nbytes:,} | {q.nbytes:,} | {measured:.4f} | {ideal:.4f} |")
  text = "\n".join(lines)
  print(text)
  os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
  with open(os.path.join(os.path.dirname(__file__), "results", "bits_per_weight.md"), "w") as f:
    f.write("# Bits per weight of a 4096x4096 kernel (float32 kernel = 32 bits)\n\n" + text + "\n")


if __name__ == "__main__":
  main()
