"""Classic baselines of a rate–distortion comparison: PSNR against bits per image.

A VQ-VAE's codes are compared with per-image colour palettes (k-means over each image's pixels), a shared codebook
of p×p patches (k-means over training patches), and the JPEG and WebP codecs. Images are uint8 arrays
[N, C, H, W] with C ∈ {1, 3}; a pixel value / 255 is its intensity in [0, 1]. Every function is deterministic: the
same input (and seed) gives the same numbers.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from dvae_cli.scoring.metrics import psnr

LOSSLESS_PSNR = 100.0
"""The PSNR reported when the mean squared error is 0."""

_IMAGES_PER_BLOCK = 256
_SCORES_PER_BLOCK = 2**24
"""float32 entries of one [images, colors, k] block of palette distances (64 MiB)."""


@dataclass(frozen=True)
class RatePoint:
    method: str
    """e.g. "kmeans-palette", "kmeans-patch4x4", "jpeg", "webp", or a model family."""
    setting: str
    """e.g. "k=4", "K=256", "q=50"."""
    bits_per_image: float
    """Mean over the images."""
    psnr: float
    """dB, as psnr_of computes it."""


def psnr_of(originals: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB of the mean squared error over all pixels of all images, values scaled to [0, 1]
    (10·log10(1/MSE)); LOSSLESS_PSNR when MSE is 0. `decoded` is uint8 like originals or float in [0, 1]."""
    if originals.shape != decoded.shape:
        raise ValueError(f"decoded shape {decoded.shape} differs from the originals' {originals.shape}")
    if originals.size == 0:
        raise ValueError("no pixels to compare")
    exact = decoded.dtype == np.uint8
    squared_error = 0.0
    for start in range(0, len(originals), _IMAGES_PER_BLOCK):
        reference = originals[start : start + _IMAGES_PER_BLOCK]
        result = decoded[start : start + _IMAGES_PER_BLOCK]
        if exact:
            # Integer differences keep the sum exact, so identical images give exactly 0.
            difference = reference.astype(np.int64) - result.astype(np.int64)
            squared_error += float(np.square(difference).sum()) / 255.0**2
        else:
            squared_error += float(np.square(reference / 255.0 - result.astype(np.float64)).sum())
    mse = squared_error / originals.size
    return LOSSLESS_PSNR if mse == 0.0 else psnr(mse)


def palette_kmeans(
    images: np.ndarray, colors: Sequence[int] = (1, 2, 4, 8, 16), iterations: int = 10
) -> list[RatePoint]:
    """Classic per-image VQ of pixel colors: each image gets its own palette of k colors found by k-means over its
    pixels; cost = H·W·log2(k) bits for the indices + k·C·8 bits for the palette (log2(1) = 0).

    Lloyd's k-means, batched over the images and run on each image's distinct colors weighted by their pixel counts
    (the same iterates as over the pixels, in less work). The initial clusters come from splitting the image's colors
    k − 1 times, each time the cluster with the largest squared error, at its mean, across its principal color axis
    (a variance-based median cut). An image stops after `iterations` Lloyd updates or once no color changes cluster;
    an empty cluster keeps its center. The palette is then rounded to 8-bit values and each pixel decoded as its
    nearest palette color.
    """
    # Not Pillow's Image.quantize(kmeans=...): that argument is a stopping threshold (iterate until fewer than
    # `kmeans` pixels change cluster), not an iteration count, and on 64×64 RGB photo crops its median cut and
    # k-means took 30 ms per image for the five default k's, a minute for 2000 images, three times this code's time.
    _check_images(images)
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")
    if min(colors, default=1) < 1:
        raise ValueError(f"a palette needs at least 1 color, got {tuple(colors)}")
    if not colors:
        return []
    n, c, h, w = images.shape
    pixels = images.reshape(n, c, h * w).transpose(0, 2, 1)
    decoded = {k: np.empty((n, c, h * w), dtype=np.uint8) for k in colors}
    most_colors = min(h * w, 256**c)
    block = max(1, _SCORES_PER_BLOCK // (most_colors * max(colors, default=1)))
    for start in range(0, n, block):
        distinct, counts, inverse = _distinct_colors(pixels[start : start + block])
        for k, initial in _split_centers(distinct, counts, set(colors)).items():
            palette = _lloyd(distinct, counts, initial, iterations).round().clamp(0, 255)
            labels = torch.gather(_nearest(distinct, palette), 1, inverse)
            decoded[k][start : start + block] = torch.gather(palette, 1, labels[..., None].expand(-1, -1, c)).mT
    return [
        RatePoint(
            "kmeans-palette",
            f"k={k}",
            h * w * math.log2(k) + k * c * 8,
            psnr_of(images, decoded[k].reshape(images.shape)),
        )
        for k in colors
    ]


@dataclass(frozen=True)
class PatchCodebook:
    """K codewords of p×p patches learned by k-means (scikit-learn): index maps of images and images of index maps."""

    model: KMeans
    patch: int

    @staticmethod
    def fit(samples: np.ndarray, size: int, patch: int, seed: int) -> PatchCodebook:
        """k-means with `size` clusters over float32 patch vectors `samples` [n, C·p·p]."""
        # scikit-learn adds the per-thread partial sums of Lloyd's update in the order the threads finish; with at
        # most two threads that order cannot change the float result, with more it can.
        with threadpool_limits(limits=2, user_api="openmp"):
            return PatchCodebook(KMeans(n_clusters=size, n_init=1, random_state=seed).fit(samples), patch)

    def codes(self, images: np.ndarray) -> np.ndarray:
        """Each patch's nearest codeword: uint8 images [N, C, H, W] → int64 index maps [N, H/p, W/p]."""
        n, _, h, w = images.shape
        with threadpool_limits(limits=2, user_api="openmp"):
            codes = self.model.predict(_patches(images, self.patch).astype(np.float32))
        return codes.astype(np.int64).reshape(n, h // self.patch, w // self.patch)

    def decode(self, codes: np.ndarray, channels: int) -> np.ndarray:
        """Index maps [N, h, w] → uint8 images [N, C, h·p, w·p] of the codewords rounded to 8-bit values."""
        codebook = np.clip(np.rint(self.model.cluster_centers_), 0, 255).astype(np.uint8)
        n, h, w = codes.shape
        return _unpatch(codebook[codes.reshape(-1)], n, channels, h * self.patch, w * self.patch, self.patch)


def patch_samples(train: np.ndarray, patch: int = 4, seed: int = 0, max_train_patches: int = 50_000) -> np.ndarray:
    """The training patches k-means learns from: at most max_train_patches of the train images', sampled with `seed`
    (uint8 [n, C·p·p])."""
    if max_train_patches < 1:
        raise ValueError(f"max_train_patches must be at least 1, got {max_train_patches}")
    samples = _patches(train, patch)
    if len(samples) > max_train_patches:
        samples = samples[np.sort(np.random.default_rng(seed).choice(len(samples), max_train_patches, replace=False))]
    return samples


def patch_kmeans(
    train: np.ndarray,
    test: np.ndarray,
    sizes: Sequence[int] = (16, 64, 256, 1024),
    patch: int = 4,
    seed: int = 0,
    max_train_patches: int = 50_000,
) -> list[RatePoint]:
    """Classic VQ of p×p patches: one codebook of K patch vectors learned by k-means (scikit-learn) on patches of the
    train images (at most max_train_patches, sampled with `seed`), each test patch coded as its nearest codeword;
    cost = (H/p)·(W/p)·log2(K) bits per image (the codebook is shared, learned once, and not charged per image).
    method is f"kmeans-patch{p}x{p}", setting f"K={K}".

    A K above the number D of distinct training patches is capped to D (setting f"K={D}"), and a capped K that
    repeats one already computed is reported once. Decoded patches are the codewords rounded to 8-bit values.
    """
    _check_images(train, "train")
    _check_images(test, "test")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train has {train.shape[1]} channels but test has {test.shape[1]}")
    if min(sizes, default=1) < 1:
        raise ValueError(f"codebook sizes must be at least 1, got {tuple(sizes)}")
    samples = patch_samples(train, patch, seed, max_train_patches)
    distinct = len(np.unique(samples, axis=0))
    samples = samples.astype(np.float32)
    n, c, h, w = test.shape
    points = []
    for size in dict.fromkeys(min(size, distinct) for size in sizes):
        codebook = PatchCodebook.fit(samples, size, patch, seed)
        decoded = codebook.decode(codebook.codes(test), c)
        bits = (h // patch) * (w // patch) * math.log2(size)
        points.append(RatePoint(f"kmeans-patch{patch}x{patch}", f"K={size}", bits, psnr_of(test, decoded)))
    return points


def pillow_codec(
    images: np.ndarray, codec: Literal["jpeg", "webp"], qualities: Sequence[int] = (5, 10, 25, 50, 75, 90, 95)
) -> list[RatePoint]:
    """Each image saved with Pillow at each quality (JPEG: grayscale stays mode "L"; WebP: lossy), bits = 8·len of the
    encoded bytes (mean over images), PSNR of the decoded images. setting f"q={q}".

    The bytes are the whole file, headers included; Pillow's other settings are its defaults (JPEG: 4:2:0 chroma
    subsampling for RGB). WebP stores a grayscale image as color, decoded back to gray with convert("L").
    """
    _check_images(images)
    if codec not in ("jpeg", "webp"):
        raise ValueError(f"codec must be 'jpeg' or 'webp', got {codec!r}")
    n, c = images.shape[:2]
    mode = "L" if c == 1 else "RGB"
    layouts = images[:, 0] if c == 1 else images.transpose(0, 2, 3, 1)
    pictures = [Image.fromarray(np.ascontiguousarray(layout)) for layout in layouts]
    points = []
    for quality in qualities:
        total_bytes = 0
        decoded = np.empty_like(images)
        for index, picture in enumerate(pictures):
            data = _encode(picture, codec, quality)
            total_bytes += len(data)
            with Image.open(io.BytesIO(data)) as back:
                pixels = np.asarray(back.convert(mode))
            decoded[index] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
        points.append(RatePoint(codec, f"q={quality}", 8 * total_bytes / n, psnr_of(images, decoded)))
    return points


def _encode(picture: Image.Image, codec: Literal["jpeg", "webp"], quality: int) -> bytes:
    """The file Pillow writes for `picture` at `quality` (WebP lossy)."""
    buffer = io.BytesIO()
    if codec == "jpeg":
        picture.save(buffer, format="JPEG", quality=quality)
    else:
        picture.save(buffer, format="WEBP", quality=quality, lossless=False)
    return buffer.getvalue()


def csv_bytes(points: Sequence[RatePoint]) -> bytes:
    """UTF-8 CSV: the header `method,setting,bits_per_image,psnr`, then one row per point, each line ending in "\\n".

    Floats are written with repr, the shortest text that reads back as the same float, so equal points give equal
    bytes.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "setting", "bits_per_image", "psnr"])
    for point in points:
        writer.writerow([point.method, point.setting, repr(float(point.bits_per_image)), repr(float(point.psnr))])
    return buffer.getvalue().encode("utf-8")


def plot_png(points: Sequence[RatePoint], title: str) -> bytes:
    """PNG of PSNR (dB) against bits per image (log x axis), one line with markers per method, and a legend.

    Drawn by matplotlib's Agg canvas on a Figure of its own (no pyplot state). Methods appear in the order of their
    first point; each line runs in order of bits. The PNG carries no Software text, so the bytes depend only on the
    points, the title and the matplotlib version.
    """
    # Imported here: matplotlib is needed only for the picture, not for the numbers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method in dict.fromkeys(point.method for point in points):
        line = sorted((p.bits_per_image, p.psnr) for p in points if p.method == method)
        axes.plot([bits for bits, _ in line], [value for _, value in line], marker="o", label=method)
    axes.set_xscale("log")
    axes.set_xlabel("bits per image")
    axes.set_ylabel("PSNR (dB)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    if points:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _check_images(images: np.ndarray, name: str = "images") -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{name} must be a uint8 array [N, C, H, W]")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got {images.shape[1]}")
    if 0 in images.shape:
        raise ValueError(f"{name} is empty: shape {images.shape}")


def _patches(images: np.ndarray, patch: int) -> np.ndarray:
    """[N·(H/p)·(W/p), C·p·p] patch vectors, row-major over the images' patch grids."""
    n, c, h, w = images.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"images of {h}×{w} pixels do not divide into {patch}×{patch} patches")
    grid = images.reshape(n, c, h // patch, patch, w // patch, patch).transpose(0, 2, 4, 1, 3, 5)
    return grid.reshape(-1, c * patch * patch)


def _unpatch(vectors: np.ndarray, n: int, c: int, h: int, w: int, patch: int) -> np.ndarray:
    """The inverse of _patches."""
    grid = vectors.reshape(n, h // patch, w // patch, c, patch, patch).transpose(0, 3, 1, 4, 2, 5)
    return grid.reshape(n, c, h, w)


def _distinct_colors(pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct colors [B, M, C] of each image's uint8 pixels [B, P, C], their pixel counts [B, M] (float64) and
    each pixel's index among them [B, P]. Images with fewer than M colors are padded with their first color, count 0.
    """
    b, p, c = pixels.shape
    codes = torch.from_numpy(pixels.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])[-c:])
    ordered, order = torch.sort(codes, dim=1, stable=True)
    starts = torch.ones(b, p, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    runs = starts.cumsum(1) - 1
    m = int(runs[:, -1].max()) + 1
    inverse = torch.empty_like(runs).scatter_(1, order, runs)
    counts = torch.zeros(b, m, dtype=torch.float64).scatter_add_(1, runs, torch.ones(b, p, dtype=torch.float64))
    # Every pixel of a run writes the same code, so the order of the writes does not matter.
    distinct = ordered[:, :1].expand(b, m).clone().scatter_(1, runs, ordered)
    values = (distinct[..., None] >> 8 * torch.arange(c - 1, -1, -1)) & 255
    return values.float(), counts, inverse


def _split_centers(colors: torch.Tensor, counts: torch.Tensor, ks: set[int]) -> dict[int, torch.Tensor]:
    """Initial centers [B, k, C] for each k in ks, from colors [B, M, C] weighted by counts [B, M]: the means of the
    clusters left after k − 1 splits, each of the cluster with the largest squared error, at its mean, across its
    principal axis. A cluster of one color splits into itself and an empty cluster (center 0)."""
    b, m, c = colors.shape
    points = colors.double()
    rows = torch.arange(b)
    largest = max(ks)
    stats = torch.zeros(b, largest, 1 + c + c * c, dtype=torch.float64)
    stats[:, 0] = _moments(points, counts)
    labels = torch.zeros(b, m, dtype=torch.long)
    centers = {}
    for existing in range(1, largest + 1):
        weight, first = stats[:, :existing, :1], stats[:, :existing, 1 : 1 + c]
        if existing in ks:
            centers[existing] = (first / weight.clamp(min=1)).float()
        if existing == largest:
            break
        trace = stats[:, :existing, 1 + c :: c + 1].sum(-1)
        target = (trace - (first * first).sum(-1) / weight[..., 0].clamp(min=1)).argmax(1)
        mine = stats[rows, target]
        mean = mine[:, 1 : 1 + c] / mine[:, :1].clamp(min=1)
        _, vectors = torch.linalg.eigh(mine[:, 1 + c :].view(b, c, c) - mean[:, :, None] * mine[:, None, 1 : 1 + c])
        across = ((points - mean[:, None]) @ vectors[..., -1:])[..., 0] > 0
        moving = (labels == target[:, None]) & across
        labels[moving] = existing
        stats[:, existing] = _moments(points, counts * moving)
        stats[rows, target] -= stats[:, existing]
    return centers


def _moments(points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, 1 + C + C·C]: Σw, Σw·x and Σw·x·xᵀ over each image's points [B, M, C] (float64) with weights [B, M].

    All terms are integers below 2^53, so the sums are exact in any order.
    """
    weighted = points * weights[..., None]
    return torch.cat([weights.sum(1, keepdim=True), weighted.sum(1), (weighted.mT @ points).flatten(1)], dim=1)


def _lloyd(colors: torch.Tensor, counts: torch.Tensor, initial: torch.Tensor, iterations: int) -> torch.Tensor:
    """[B, k, C] cluster centers of each image's colors [B, M, C], weighted by counts [B, M], after at most
    `iterations` Lloyd updates from the centers `initial`; an empty cluster keeps its center."""
    centers = initial.clone()
    rows = torch.arange(len(colors))
    # float64 sums of counts and count·value are exact, so the means do not depend on the order of summation.
    weighted = torch.cat([colors.double() * counts[..., None], counts[..., None]], dim=2)
    current = initial
    labels = _nearest(colors, current)
    for _ in range(iterations):
        sums = torch.zeros(*current.shape[:2], weighted.shape[2], dtype=torch.float64)
        sums.scatter_add_(1, labels[..., None].expand(-1, -1, weighted.shape[2]), weighted)
        sizes = sums[..., -1:]
        current = torch.where(sizes > 0, (sums[..., :-1] / sizes.clamp(min=1)).float(), current)
        centers[rows] = current
        new_labels = _nearest(colors, current)
        changed = torch.nonzero((new_labels != labels).any(1))[:, 0]
        labels = new_labels
        if len(changed) == 0:
            break
        if len(changed) < len(rows):
            # Only the images whose colors still move go on.
            rows, colors, weighted, current, labels = (t[changed] for t in (rows, colors, weighted, current, labels))
    return centers


def _nearest(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index [B, M] of each point's nearest center [B, k, C] (the first of equals)."""
    # |x − c|² = |x|² − 2x·c + |c|², and |x|² is the same for every center.
    return torch.baddbmm((centers * centers).sum(-1)[:, None, :], points, centers.mT, alpha=-2).argmin(-1)
