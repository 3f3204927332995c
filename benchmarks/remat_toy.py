"""Does XLA on this backend turn ``jax.checkpoint`` into lower peak memory at all?

  python benchmarks/remat_toy.py

A chain of 16 dense+tanh layers (4096x1024 activations, 16 MiB each), its gradient compiled
with no remat and with remat of blocks of 4 layers; prints ``memory_analysis()``'s temporary
bytes. In theory block remat keeps 4 block inputs plus one block's recomputed activations
(about half of the 16 saved activations). If it does not fall here, the backend's scheduler,
not the model's remat, decides (docs/benchmarks.md, "Train-step memory").
"""

import jax
import jax.numpy as jnp


def layer(w, x):
  return jnp.tanh(x @ w)


def loss(ws, x, remat: bool):
  def block(ws4, x):
    for w in ws4:
      x = layer(w, x)
    return x
  f = jax.checkpoint(block) if remat else block
  for i in range(0, len(ws), 4):
    x = f(ws[i:i + 4], x)
  return jnp.sum(x ** 2)


def main():
  ws = [jnp.full((1024, 1024), 1e-3) for _ in range(16)]
  x = jnp.ones((4096, 1024))
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  for remat in (False, True):
    compiled = jax.jit(jax.grad(lambda w, v: loss(w, v, remat))).lower(ws, x).compile()  # noqa: B023
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"remat={'block of 4' if remat else 'none'}: temp {temp:.0f} MiB")


if __name__ == "__main__":
  main()
