"""A batch of tiles' class probabilities from the model: the softmax, and its mean over test-time
views (each tile's mirror images, and views of it read at other scales, resampled onto it)."""

import torch
from torch.nn.functional import affine_grid, grid_sample

from biopsy.slide import SCALE_RANGE

MIRRORS = ((), (3,), (2,), (2, 3))  # flipped (N, C, H, W) dims: the tile, left-right, up-down, both


def batch_probabilities(model, views: list[torch.Tensor], scales: tuple[float, ...], autocast,
                        patch_px: int, tta: bool) -> torch.Tensor:
    """Class probabilities (:func:`tile_probabilities`) of a batch of tiles, the mean over its
    ``views``: normalised batches (N, C, H, W), one per scale in ``scales`` (the batch read at
    that scale: :class:`~biopsy.tiling.TileDataset`), the model run under ``autocast``. With
    ``tta``, each view's probabilities are the mean over :data:`MIRRORS` (each mirror image's
    probabilities flipped back). A view at scale s != 1 is resampled bilinearly onto the tile's
    pixels: for s > 1 its centre 1/s, where the tile lies; for s < 1 it covers the tile's centre
    s only, and each pixel's mean is over the views that cover it."""
    mirrors = MIRRORS if tta else ((),)
    total, coverage = None, 0
    for view, scale in zip(views, scales, strict=True):
        view_total = None
        for dims in mirrors:
            with autocast:
                logits = model(view.flip(dims) if dims else view)
            probabilities = tile_probabilities(logits, patch_px)
            probabilities = probabilities.flip(dims) if dims else probabilities
            view_total = probabilities if view_total is None else view_total.add_(probabilities)
        if scale != 1:  # resampling is linear: once for the sum over mirror images
            view_total = _onto_tile(view_total, scale)
        total = view_total if total is None else total.add_(view_total)
        covered = 1 if scale >= 1 else _onto_tile(total.new_ones(1, 1, patch_px, patch_px), scale)
        coverage = coverage + covered * len(mirrors)
    return total.div_(coverage)


def _onto_tile(probabilities: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, C, H, W) ``probabilities`` of a view at ``scale`` (centred on the tile, ``scale`` times
    its side) resampled bilinearly onto the tile's (H, W) pixels; 0 where the view does not
    reach (the border of a view at scale < 1)."""
    # made on the device: a tensor copied from the host would wait for the device to finish
    zoom = torch.eye(2, 3, dtype=probabilities.dtype, device=probabilities.device) / scale
    zoom = zoom.expand(len(probabilities), 2, 3)
    points = affine_grid(zoom, list(probabilities.shape), align_corners=False)
    return grid_sample(probabilities, points, mode="bilinear", align_corners=False)


def check_scales(scales: tuple[float, ...]) -> None:
    """Raise ValueError unless ``scales`` are in :data:`SCALE_RANGE`, at least one >= 1 (so that
    some view covers the whole tile)."""
    low, high = SCALE_RANGE
    if not scales or not all(low <= s <= high for s in scales) or max(scales) < 1:
        raise ValueError(f"reading scales must be multiples of the model's mpp from {low:g} to "
                         f"{high:g}, at least one >= 1; got {list(scales)}")


def tile_probabilities(logits: torch.Tensor, patch_px: int) -> torch.Tensor:
    """Class probabilities (B, C, patch, patch), float32, contiguous, from a model's logits.

    The logits come channels_last; the softmax over classes runs on a contiguous copy, ~4x
    faster on CPU than over the interleaved classes (11 classes do not fill a vector), and
    the stitcher adds contiguous tiles. The softmax is computed in place on that copy: one
    batch-sized allocation fewer, which keeps the heap from growing over thousands of batches.
    Models with a coarser output stride are upsampled."""
    logits = logits.contiguous().float()
    if logits.shape[-2:] != (patch_px, patch_px):
        logits = torch.nn.functional.interpolate(logits, size=(patch_px, patch_px),
                                                 mode="bilinear", align_corners=False)
    logits = logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))
