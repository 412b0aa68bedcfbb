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


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float:
  """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), float64.

  tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
  symmetric positive semi-definite A^(1/2) S_b A^(1/2), with A^(1/2) from S_a's
  eigendecomposition and eigenvalues clipped at 0: it stays real and finite for singular or
  nearly singular covariances (fewer images than features), where a general matrix square
  root of the product may not.
  """
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
  if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
    raise ValueError(f'statistics of different shapes: mu {mu_a.shape}, {mu_b.shape}; '
            f'sigma {sigma_a.shape}, {sigma_b.shape}')
  values, vectors = np.linalg.eigh((sigma_a + sigma_a.T) / 2)
  root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
  middle = root_a @ sigma_b @ root_a
  trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)
