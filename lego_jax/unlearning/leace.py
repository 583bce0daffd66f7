"""LEACE: closed-form linear concept erasure (Belrose et al., 2023), per attribute.

For one attribute with one-hot labels Z, fitted on the labelled users:
  W = (Sigma_xx^{1/2})^+ (whitening by eigendecomposition; eigenvalues below
      `rcond` times the largest count as zero, so rank-deficient tables work),
  P = orthogonal projection onto col(W Sigma_xz),
  x' = x - W^+ P W (x - mu).
Afterwards Cov(x', Z) = 0 on the fitted users, i.e. every class-conditional mean
equals the global mean, so no linear classifier beats a constant predictor
(for any convex loss), and the edit is the smallest one that does so in mean
squared norm. A pseudo-inverse rather than a ridge: a ridge would blow up the
null directions of an already-erased table, so refitting on it would "erase"
float32 noise and move the users along random directions.

Several attributes are erased one after another, each eraser fitted on the
previous one's output. An eraser is an affine map, and an affine map sends
equal class means to equal class means, so a later eraser does not re-expose
an earlier attribute to linear probes; `rounds > 1` refits the whole chain
anyway (a no-op up to float error, kept for float32 drift and as a check).

Fitting runs in float64 numpy (deterministic on any device); `apply` works on
numpy and JAX arrays alike (jit-able) and keeps the input dtype.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lego_jax import nn
from lego_jax.errors import LegoError

RCOND = 1e-10   # eigenvalues of Sigma_xx below RCOND * the largest are treated as 0
# Singular values of W Sigma_xz (whitened class correlations, at most 0.5) below
# this are float noise, not a concept: a linear probe cannot use them.
ATOL = 1e-6


class Eraser(NamedTuple):
  """x' = x - (x - mean) @ proj.T; proj = W^+ P W is an oblique projection of rank `rank`."""
  mean: np.ndarray   # (D,) float64, mean of the fitted (labelled) users
  proj: np.ndarray   # (D, D) float64
  rank: int          # rank of proj (at most the number of present classes - 1)
  n_fit: int         # labelled users it was fitted on


def identity(dim: int) -> Eraser:
  """The eraser that changes nothing."""
  return Eraser(np.zeros(dim), np.zeros((dim, dim)), 0, 0)


def _check_x(x) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise LegoError(f"leace: embeddings must be (users, dim), got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise LegoError("leace: embeddings contain NaN or inf")
  return x


def _check_codes(codes, n: int, num_classes: int) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.shape != (n,):
    raise LegoError(f"leace: labels must have shape ({n},), got {codes.shape}")
  return nn.check_labels(codes, [num_classes], who="leace", names=["the attribute"])[0][0]


def fit(x, codes, num_classes: int, *, rcond: float = RCOND) -> Eraser:
  """The LEACE eraser of one attribute, fitted on the users with a label.

  x: (n, D); codes: (n,) ints, -1 = missing. Where fewer than two classes have
  labelled users there is nothing to erase and the identity eraser is returned.
  """
  x = _check_x(x)
  n, dim = x.shape
  codes = _check_codes(codes, n, int(num_classes))
  keep = codes >= 0
  xl, zl = x[keep], codes[keep]
  if np.unique(zl).size < 2:
    return identity(dim)
  m = xl.shape[0]
  mu = xl.mean(0)
  xc = xl - mu
  z = np.zeros((m, int(num_classes)))
  z[np.arange(m), zl] = 1.0
  sigma_xz = xc.T @ (z - z.mean(0)) / m           # (D, C)
  sigma_xx = xc.T @ xc / m                         # (D, D)
  evals, evecs = np.linalg.eigh((sigma_xx + sigma_xx.T) / 2)
  keep_dir = evals > rcond * max(float(evals.max()), 1e-300)
  root = np.sqrt(np.where(keep_dir, evals, 0.0))
  inv_root = np.where(keep_dir, 1.0 / np.where(keep_dir, root, 1.0), 0.0)
  whiten = (evecs * inv_root) @ evecs.T           # W = (Sigma^{1/2})^+
  unwhiten = (evecs * root) @ evecs.T             # W^+ = Sigma^{1/2}
  u, s, _ = np.linalg.svd(whiten @ sigma_xz, full_matrices=False)
  r = int(np.sum(s > ATOL))
  basis = u[:, :r]
  proj = unwhiten @ basis @ basis.T @ whiten
  return Eraser(mu, proj, r, int(m))


def apply(eraser: Eraser, x):
  """x - (x - mean) @ proj.T for every row of x (labelled or not); keeps x's dtype.

  numpy in, numpy out (computed in float64); a JAX array or tracer in, JAX out
  (full-precision matmul, so GPUs do not fall back to TF32).
  """
  if isinstance(x, jax.Array):
    mean = jnp.asarray(eraser.mean, x.dtype)
    proj = jnp.asarray(eraser.proj, x.dtype)
    return x - jnp.matmul(x - mean, proj.T, precision=jax.lax.Precision.HIGHEST)
  x = np.asarray(x)
  dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
  x64 = x.astype(np.float64)
  return (x64 - (x64 - eraser.mean) @ eraser.proj.T).astype(dtype)


def fit_chain(x, labels, num_classes: Sequence[int], *, rounds: int = 1,
              rcond: float = RCOND) -> list[Eraser]:
  """Erasers for every attribute in order, each fitted on the previous output,
  the whole chain repeated `rounds` times. labels: (K, n) ints, -1 = missing."""
  x = _check_x(x)
  labels, num_classes = nn.check_labels(labels, num_classes, who="leace", n_users=x.shape[0])
  if int(rounds) < 1:
    raise LegoError(f"leace: rounds must be >= 1, got {rounds}")
  chain = []
  for _ in range(int(rounds)):
    for k, c in enumerate(num_classes):
      eraser = fit(x, labels[k], c, rcond=rcond)
      x = apply(eraser, x)
      chain.append(eraser)
  return chain


def apply_chain(chain: Sequence[Eraser], x):
  for eraser in chain:
    x = apply(eraser, x)
  return x


def erase(x, labels, num_classes: Sequence[int], *, rounds: int = 1,
          rcond: float = RCOND):
  """Every attribute of `labels` (K, n) erased from x (n, D), composed in order;
  returns x' with x's shape and dtype (numpy)."""
  x_in = np.asarray(x)
  chain = fit_chain(x_in, labels, num_classes, rounds=rounds, rcond=rcond)
  dtype = x_in.dtype if np.issubdtype(x_in.dtype, np.floating) else np.float64
  return apply_chain(chain, x_in.astype(np.float64)).astype(dtype)
