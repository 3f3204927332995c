"""Sample-quality statistics on feature vectors and pixels: numpy, no network here.

* ``frechet_distance`` -- FID's distance between two Gaussians (Heusel et al. 2017);
* ``kid`` -- Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial
  kernel over random subsets (Binkowski et al. 2018);
* ``precision_recall`` -- improved precision and recall with k-NN balls
  (Kynkaanniemi et al. 2019);
* ``colour_stats`` -- per-channel mean, std and 1-D Wasserstein distance of pixel values;
* ``nearest_neighbours`` -- pixel distance of each sample to its closest training image.

Everything is float64 on the host: the numbers are reductions over a few thousand
vectors, and FID is notoriously sensitive to precision in the matrix square root.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of (N, D) features."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

  Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
  symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2:
  no complex parts to discard, unlike ``scipy.linalg.sqrtm(S1 @ S2)``.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"shapes differ: {mu1.shape} vs {mu2.shape}, {s1.shape} vs {s2.shape}")
  r1 = _sqrt_psd(s1)
  m = r1 @ s2 @ r1
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def kid(x: np.ndarray, y: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: mean and std over subsets of the unbiased MMD^2.

  Kernel k(a, b) = (a.b / D + 1)^3. Subsets have ``min(subset_size, len(x), len(y))``
  elements, drawn without replacement.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  d = x.shape[1]
  m = min(subset_size, len(x), len(y))
  if m < 2:
    raise ValueError("KID needs at least 2 vectors on each side")
  rng = np.random.default_rng(seed)
  vals = []
  for _ in range(num_subsets):
    a = x[rng.choice(len(x), m, replace=False)]
    b = y[rng.choice(len(y), m, replace=False)]
    kxx = (a @ a.T / d + 1) ** 3
    kyy = (b @ b.T / d + 1) ** 3
    kxy = (a @ b.T / d + 1) ** 3
    mmd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
           + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    vals.append(mmd)
  vals = np.asarray(vals)
  return float(vals.mean()), float(vals.std())


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
  return np.maximum(d, 0)


def _knn_radii(f: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
  """Squared distance of each row of f to its k-th nearest other row."""
  out = np.empty(len(f))
  for s in range(0, len(f), chunk):
    d = _sq_dists(f[s:s + chunk], f)
    # The k-th smallest excluding the point itself (distance 0 at index k=0).
    out[s:s + chunk] = np.partition(d, k, axis=1)[:, k]
  return out


def _coverage(query: np.ndarray, ref: np.ndarray, radii: np.ndarray, chunk: int = 2048) -> float:
  inside = []
  for s in range(0, len(query), chunk):
    inside.append((_sq_dists(query[s:s + chunk], ref) <= radii[None]).any(1))
  return float(np.concatenate(inside).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
  """Improved precision (fake inside the real manifold) and recall (real inside fake's).

  Each set's manifold is the union of balls around its vectors reaching their k-th
  nearest neighbour in the same set (Kynkaanniemi et al. 2019, k = 3).
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} vectors per side")
  return {"precision": _coverage(fake, real, _knn_radii(real, k)),
          "recall": _coverage(real, fake, _knn_radii(fake, k)), "k": k}


def colour_stats(samples: np.ndarray, data: np.ndarray) -> dict:
  """Per-channel mean/std of uint8 images (N, H, W, C) and the distance between them.

  ``w1`` is the 1-D Wasserstein distance between the two sets' pixel-value
  distributions of each channel, in 8-bit levels (0 = identical histograms).
  """
  out = {}
  names = "RGB" if samples.shape[-1] == 3 else [str(i) for i in range(samples.shape[-1])]
  for c, name in enumerate(names):
    s = samples[..., c].ravel().astype(np.int64)
    d = data[..., c].ravel().astype(np.int64)
    cdf_s = np.cumsum(np.bincount(s, minlength=256)) / s.size
    cdf_d = np.cumsum(np.bincount(d, minlength=256)) / d.size
    out[name] = {"sample_mean": float(s.mean()), "data_mean": float(d.mean()),
                 "sample_std": float(s.std()), "data_std": float(d.std()),
                 "w1": float(np.abs(cdf_s - cdf_d).sum())}
  return out


def nearest_neighbours(query: np.ndarray, train: np.ndarray, chunk: int = 512):
  """For each query image, the RMS pixel distance (images in [0, 1]) to its closest
  training image, and that image's index. Inputs are (N, H, W, C) in [-1, 1] or uint8."""
  def flat(x):
    x = np.asarray(x)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else (x.astype(np.float32) + 1) / 2
    return x.reshape(len(x), -1)
  q, t = flat(query), flat(train)
  tn = (t * t).sum(1)
  dist, idx = np.empty(len(q), np.float64), np.empty(len(q), np.int64)
  for s in range(0, len(q), chunk):
    qs = q[s:s + chunk]
    d = (qs * qs).sum(1)[:, None] + tn[None] - 2 * qs @ t.T
    i = d.argmin(1)
    idx[s:s + chunk] = i
    # The expansion above finds the neighbour; the distance itself is recomputed directly
    # (|q|^2 + |t|^2 - 2 q.t loses precision in float32 when q is close to t).
    dist[s:s + chunk] = np.sqrt(((qs.astype(np.float64) - t[i]) ** 2).mean(1))
  return dist, idx
