"""FID and KID between feature sets, pluggable feature extractors, and cached Shapes reference features.

Owns the statistics (mean and covariance, the Frechet distance, the unbiased KID estimator), the
feature-extractor protocol and its registry (`get_extractor`), batching images through an extractor, and
the on-disk cache of reference features of real Shapes renders. Needs numpy (and torch for extractors);
no scipy at run time.

A feature extractor is any object with `.name: str`, `.dim: int` and `__call__(images) -> [N, dim]` float
array, where images are uint8 [N, H, W, 3] of any H, W (the extractor resizes itself). An optional
`.cache_key: str` (e.g. a short weights hash) keeps cached reference features of different weights apart.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from inkwash.data.base import to_uint8_hwc
from inkwash.errors import UserError

EXTRACTOR_SPECS = ("inception:/path/to/pt_inception-2015-12-05-6726825d.pth", "shapes")
REFERENCE_SEED = 12345  # Shapes seed for reference images; training uses seed 0


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 images [N, H, W, 3] to features [N, dim]."""

    name: str
    dim: int

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------- statistics


def _as_features(feats: np.ndarray, what: str = "features") -> np.ndarray:
    """The features as float64 [N, d] with N >= 2, or a UserError."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise UserError(f"The {what} must be a 2-d array [N, dim], got shape {list(feats.shape)}.")
    if feats.shape[0] < 2:
        raise UserError(f"FID and KID need at least 2 samples of {what}, got {feats.shape[0]}.")
    if not np.isfinite(feats).all():
        raise UserError(f"The {what} contain NaN or infinite values.")
    return feats


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], covariance [d, d]) of features [N, d] in float64; covariance with ddof=1 as pytorch-fid."""
    feats = _as_features(feats)
    mu = feats.mean(axis=0)
    centred = feats - mu
    sigma = centred.T @ centred / (feats.shape[0] - 1)
    return mu, sigma


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigendecomposition (negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)), in float64, without scipy."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise UserError(
            f"Frechet distance needs means [d] and covariances [d, d] of one dimension, got means "
            f"{list(mu1.shape)} and {list(mu2.shape)}, covariances {list(s1.shape)} and {list(s2.shape)}."
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    # Tr sqrt(S1 S2) = sum of sqrt eigenvalues of the similar, symmetric PSD matrix sqrt(S1) S2 sqrt(S1).
    root1 = _sym_sqrt(s1)
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples with the kernel k(a, b) = (a.b / d + 1)^3."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off_diag = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off_diag - 2.0 * kxy.mean())


def kid(
    feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) over random subsets of the unbiased MMD^2 with the cubic polynomial kernel (KID)."""
    x, y = _as_features(feats1, "first features"), _as_features(feats2, "second features")
    if x.shape[1] != y.shape[1]:
        raise UserError(f"KID needs features of one dimension, got {x.shape[1]} and {y.shape[1]}.")
    if subsets < 1 or subset_size < 2:
        raise UserError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}.")
    m = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        xi = rng.choice(x.shape[0], m, replace=False)
        yi = rng.choice(y.shape[0], m, replace=False)
        values[s] = _mmd2_unbiased(x[xi], y[yi])
    return float(values.mean()), float(values.std())


def fid_kid(gen_feats: np.ndarray, ref_feats: np.ndarray, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """{fid, kid, kid_std, n_gen, n_ref} between generated and reference features."""
    gen, ref = _as_features(gen_feats, "generated features"), _as_features(ref_feats, "reference features")
    if gen.shape[1] != ref.shape[1]:
        raise UserError(f"Generated and reference features differ in dimension: {gen.shape[1]} vs {ref.shape[1]}.")
    fid = frechet_distance(*feature_stats(gen), *feature_stats(ref))
    kid_mean, kid_std = kid(gen, ref, subsets=kid_subsets, subset_size=kid_subset_size)
    return {"fid": fid, "kid": kid_mean, "kid_std": kid_std, "n_gen": len(gen), "n_ref": len(ref)}


# ---------------------------------------------------------------------------------------------- extractors


def get_extractor(spec: str) -> FeatureExtractor:
    """The feature extractor named by `spec`: "inception:/path/to/weights" or "shapes"."""
    kind, _, arg = spec.partition(":")
    if kind == "inception":
        if not arg:
            raise UserError(
                "The inception extractor needs its weights file, as inception:/path/to/"
                "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's weights; nothing is downloaded)."
            )
        from inkwash.eval.inception import InceptionFeatures

        return InceptionFeatures.from_file(arg)
    if spec == "shapes":
        from inkwash.eval.shapes_features import load_shapes_features

        return load_shapes_features()
    raise UserError(f"Unknown feature extractor {spec!r}; valid ones are {' and '.join(EXTRACTOR_SPECS)}.")


def features(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """Features [N, dim] (float64) of uint8 images [N, H, W, 3], computed `batch_size` at a time."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(
            f"Feature extractors take uint8 images of shape [N, H, W, 3], got {images.dtype} {list(images.shape)}."
        )
    out = np.empty((len(images), extractor.dim), np.float64)
    for start in range(0, len(images), max(1, batch_size)):
        batch = images[start : start + batch_size]
        feats = np.asarray(extractor(batch))
        if feats.shape != (len(batch), extractor.dim):
            raise UserError(
                f"Feature extractor {extractor.name!r} returned shape {list(feats.shape)} "
                f"for {len(batch)} images, expected [{len(batch)}, {extractor.dim}]."
            )
        out[start : start + len(batch)] = feats
    return out


# ---------------------------------------------------------------------------------------------- reference


def cache_dir() -> Path:
    """Where reference features are cached: $INKWASH_CACHE/fid, else ~/.cache/inkwash/fid."""
    root = os.environ.get("INKWASH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "inkwash") / "fid"


def _cache_path(extractor: FeatureExtractor, size: int, n: int, seed: int) -> Path:
    """Cache file for one (extractor, weights, size, n, seed)."""
    key = extractor.name + (f"-{extractor.cache_key}" if getattr(extractor, "cache_key", "") else "")
    key = re.sub(r"[^A-Za-z0-9._-]", "_", key)
    return cache_dir() / f"shapes-{key}-s{size}-n{n}-seed{seed}.npy"


def shapes_reference_features(
    extractor: FeatureExtractor,
    size: int,
    n: int = 2000,
    seed: int = REFERENCE_SEED,
    batch_size: int = 50,
    use_cache: bool = True,
) -> np.ndarray:
    """Features [n, dim] of `n` real Shapes renders at `size` px (indices 0..n-1 of seed `seed`), cached."""
    if n < 2:
        raise UserError(f"Reference statistics need at least 2 images, got n={n}.")
    path = _cache_path(extractor, size, n, seed)
    if use_cache and path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape == (n, extractor.dim):
                return cached
        except (OSError, ValueError):
            pass  # unreadable cache: recompute and overwrite
    from inkwash.data.shapes import ShapesDataset

    dataset = ShapesDataset(size=size, seed=seed)
    out = np.empty((n, extractor.dim), np.float64)
    for start in range(0, n, batch_size):
        images, _, _ = dataset.batch(range(start, min(n, start + batch_size)))
        out[start : start + len(images)] = features(extractor, to_uint8_hwc(images), batch_size=batch_size)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, path)
    return out
