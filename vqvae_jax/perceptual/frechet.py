"""Feature statistics and the Fréchet distance between them, in float64 numpy."""

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and covariance (D, D) of (N, D) features, float64, covariance with N - 1.

  Raises:
   ValueError: fewer than 2 rows, or not a 2-D array.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'features must be (N >= 2, D), got shape {features.shape}')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_root(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root; eigenvalues under the rounding level (dim * eps * largest) are 0."""
  values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
  floor = len(values) * np.finfo(np.float64).eps * max(values.max(), 0.0)
  return (vectors * np.sqrt(np.where(values > floor, values, 0.0))) @ vectors.T


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float:
  """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), float64.

  tr((S_a S_b)^(1/2)) is the sum of the singular values of S_b^(1/2) S_a^(1/2), the symmetric
  roots taken from eigendecompositions with eigenvalues under the rounding level set to 0. It
  stays real, and exact to rounding, for singular or nearly singular covariances (fewer images
  than features), where a general square root of the product S_a S_b, or square roots of
  eigenvalues at the rounding level, add noise of order sqrt(eps) per direction.

  Raises:
    ValueError: the statistics' shapes differ or are not (D,) and (D, D).
  """
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
  if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
    raise ValueError(f'statistics of different shapes: mu {mu_a.shape}, {mu_b.shape}; '
                     f'sigma {sigma_a.shape}, {sigma_b.shape}')
  trace_root = np.linalg.svd(_psd_root(sigma_b) @ _psd_root(sigma_a), compute_uv=False).sum()
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)
