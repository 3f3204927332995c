"""Step time and peak RSS of one 64 px batch-8 train step with and without remat (CPU).

  python benchmarks/remat_time.py

Each remat setting is timed twice, alternating (median of 5 steps after a warm-up each time),
so the machine's drift falls on both; the ratio is of the two best medians.
"""

import json
import os
import sys

sys.argv = sys.argv[:1]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory as m  # noqa: E402


def main():
  for remat in ("none", "block"):
    print(f"RSS 64 px batch 8 remat={remat}: {m.rss(64, 8, remat)}", flush=True)
  ts = {"none": [], "block": []}
  for _ in range(2):
    for remat in ("none", "block"):
      ts[remat].append(m.step_time(64, 8, remat, steps=5))
  print(json.dumps(ts))
  print(f"ratio block/none (best medians): {min(ts['block']) / min(ts['none']):.3f}")


if __name__ == "__main__":
  main()
