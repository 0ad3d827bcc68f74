"""Gaussian-blended stitching of tile probabilities, streamed in bands of rows.

Each tile's class probabilities are weighted by a Gaussian centred on the tile (sigma = patch / 8,
as nnU-Net and MONAI's ``mode="gaussian"``), so a pixel's prediction comes mostly from the tiles in
which it lies far from the border. The weighted sums live on the model's device in a buffer of
``patch_px`` rows spanning the slide's width. Tiles arrive in row-major order; when a tile row
starts at row ``r``, every row above ``r`` is final: it is normalised, arg-maxed, sampled at the
output mpp, copied to the host and dropped from the buffer. Memory is bounded by slide width x
patch height x classes, never by slide area.

On CUDA nothing here waits for the device while fewer than ``MAX_PENDING_BANDS`` bands are held:
every index lives on the device from the start, pixels outside the tissue are set to the
background there, and finished rows are copied to pinned host memory without blocking; a band is
handed back once its copy has completed, so the host keeps queueing tiles while the device works.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from biopsy.decision import decide_classes

MIN_WEIGHT = 1e-3  # floor of the Gaussian (MONAI's), so tile corners still count where alone
MAX_PENDING_BANDS = 8  # bands held before the oldest is waited for (bounds pinned memory)


def gaussian_weight(patch_px: int, sigma_scale: float = 0.125, device="cpu") -> torch.Tensor:
    """(patch, patch) Gaussian weight, 1 at the centre, floored at ``MIN_WEIGHT``."""
    offsets = torch.arange(patch_px, dtype=torch.float32, device=device) - (patch_px - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * (sigma_scale * patch_px) ** 2))
    return torch.outer(profile, profile).clamp_(min=MIN_WEIGHT)


def output_index(size_px: int, grid_mpp: float, output_mpp: float, grid_size_px: int) -> np.ndarray:
    """For each output pixel along an axis, the grid pixel under its centre (nearest sampling)."""
    centres = (np.arange(size_px) + 0.5) * (output_mpp / grid_mpp)
    return np.clip(np.floor(centres).astype(np.int64), 0, grid_size_px - 1)


@dataclass(frozen=True)
class Band:
    """Consecutive finished rows at the output mpp: class indices (h, w) uint8 and, if asked,
    class probabilities (C, h, w) uint8 scaled so that 255 = 1 (where no tile ran: 1 for the
    background class the label there gives, 0 for the rest).
    Writable: their consumer may edit them in place."""

    labels: np.ndarray
    probabilities: np.ndarray | None


class BandStitcher:
    """Accumulates Gaussian-weighted tile probabilities and hands back finished rows in bands.

    Parameters
    ----------
    class_names : the model's classes.
    grid_shape_px, grid_mpp : (height, width) of the slide at the grid's (the model's) mpp.
    output_shape_px, output_mpp : the same for the output map, whose pixels are sampled from the
        grid with :func:`output_index`.
    patch_px : tile side at the grid's mpp.
    background_index : label of pixels no tile covers.
    keep_probabilities : also hand back the normalised probabilities.
    device : where the sums live (the model's device).
    glomerulus_threshold : decide glomerulus first (:func:`biopsy.decision.decide_classes`).
    tissue_mask, tissue_mpp : where classes may be (bool (rows, cols) at ``tissue_mpp`` µm/px,
        sampled with :func:`output_index`); pixels outside it get ``background_index`` and zero
        probabilities. None: everywhere.
    """

    def __init__(self, class_names: Sequence[str], grid_shape_px: tuple[int, int], grid_mpp: float,
                 output_shape_px: tuple[int, int], output_mpp: float, patch_px: int,
                 background_index: int, keep_probabilities: bool = False, device="cpu",
                 glomerulus_threshold: float | None = None, tissue_mask: np.ndarray | None = None,
                 tissue_mpp: float | None = None):
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.glomerulus_threshold = glomerulus_threshold
        self.patch_px = patch_px
        self.background_index = background_index
        self.keep_probabilities = keep_probabilities
        self.grid_height_px = grid_shape_px[0]
        self.output_width_px = output_shape_px[1]
        self.source_rows = output_index(output_shape_px[0], grid_mpp, output_mpp, grid_shape_px[0])
        self.source_rows_on_device = torch.from_numpy(self.source_rows).to(device)
        source_cols = output_index(output_shape_px[1], grid_mpp, output_mpp, grid_shape_px[1])
        identity = np.array_equal(source_cols, np.arange(len(source_cols)))
        self.source_cols = None if identity else torch.from_numpy(source_cols).to(device)
        if tissue_mask is not None and tissue_mpp is None:
            raise ValueError("a tissue mask needs its tissue_mpp")
        self.outside = None if tissue_mask is None else _Outside(
            tissue_mask, tissue_mpp, output_shape_px, output_mpp, device)
        self.pending: deque[tuple[torch.cuda.Event | None, Band]] = deque()
        width = max(grid_shape_px[1], patch_px)
        # channels 0..C-1: weighted probabilities; channel C: the sum of weights
        self.sums = torch.zeros((self.num_classes + 1, patch_px, width), dtype=torch.float32,
                                device=device)
        self.weight = gaussian_weight(patch_px, device=device)
        self.top = 0  # grid row held in the buffer's first row; rows above it are final
        self.next_output_row = 0

    def add(self, probabilities: torch.Tensor, origins_px: np.ndarray) -> list[Band]:
        """Add tiles' probabilities (B, C, patch, patch) at grid (row, col) ``origins_px``.

        Tiles must come in row-major order. Returns the finished bands whose rows have reached
        the host (on CUDA, those finished by earlier calls, as their copies complete).
        """
        for (row, col), tile in zip(origins_px.tolist(), probabilities.float()):
            if row != self.top:
                if row < self.top:
                    raise ValueError(f"tiles out of row-major order: row {row} after {self.top}")
                self._advance(row)
            window = self.sums[:, :, col : col + self.patch_px]
            window[: self.num_classes].addcmul_(tile, self.weight)
            window[self.num_classes] += self.weight
        return self._copied_bands()

    def finish(self) -> list[Band]:
        """The remaining rows, down to the bottom of the output (every band still held)."""
        self._advance(self.grid_height_px)
        return self._copied_bands(wait=True)

    def _advance(self, row: int) -> None:
        """Finish every grid row above ``row`` and move the buffer down to start at ``row``."""
        held_end = self.top + self.patch_px
        self._band_from_buffer(min(row, held_end))
        self._background_band(row)
        keep = max(0, held_end - row)
        if keep:
            self.sums[:, :keep] = self.sums[:, self.patch_px - keep :].clone()
        self.sums[:, keep:] = 0
        self.top = row

    def _copied_bands(self, wait: bool = False) -> list[Band]:
        """The held bands, in order, up to the first whose copy to the host is still running
        (all of them when ``wait``, or as many as keep at most MAX_PENDING_BANDS held); bands
        copied from the device come in ordinary memory, so that the pinned buffers are reused."""
        bands = []
        while self.pending:
            copied, band = self.pending[0]
            if copied is not None and not copied.query():
                if not wait and len(self.pending) <= MAX_PENDING_BANDS:
                    break
                copied.synchronize()
            self.pending.popleft()
            bands.append(band if copied is None else Band(
                band.labels.copy(), None if band.probabilities is None else band.probabilities.copy()))
        return bands

    def _take_output_rows(self, end: int) -> np.ndarray:
        """Output rows not yet handed back whose source grid row lies above ``end``."""
        stop = int(np.searchsorted(self.source_rows, end, side="left"))
        rows = np.arange(self.next_output_row, max(stop, self.next_output_row))
        self.next_output_row = max(stop, self.next_output_row)
        return rows

    def _band_from_buffer(self, end: int) -> None:
        """Hold the output rows whose grid rows lie above ``end``, their copy to the host begun."""
        rows = self._take_output_rows(end)
        if not len(rows):
            return
        sampled = self._sample(rows)
        weights = sampled[self.num_classes]
        labels = decide_classes(sampled[: self.num_classes], self.class_names,
                                self.glomerulus_threshold).to(torch.uint8)
        untouched = weights == 0
        if self.outside is not None:
            untouched |= self.outside.rows(rows[0], rows[-1] + 1)
        labels.masked_fill_(untouched, self.background_index)
        probabilities = None
        if self.keep_probabilities:
            normalised = sampled[: self.num_classes] / weights.clamp(min=MIN_WEIGHT**2)
            probabilities = (normalised * 255).round_().to(torch.uint8).masked_fill_(untouched, 0)
            probabilities[self.background_index].masked_fill_(untouched, 255)
        self._hold(labels, probabilities)

    def _sample(self, output_rows: np.ndarray) -> torch.Tensor:
        """The sums under consecutive ``output_rows`` at the output's columns (a view when these
        are plain ranges, as when the output mpp is the grid's)."""
        local_rows = self.source_rows[output_rows] - self.top
        if np.all(np.diff(local_rows) == 1):
            rows = self.sums[:, local_rows[0] : local_rows[-1] + 1]
        else:  # the index is already on the device: a copy from the host would wait for it
            index = self.source_rows_on_device[output_rows[0] : output_rows[-1] + 1] - self.top
            rows = self.sums.index_select(1, index)
        if self.source_cols is None:
            return rows[:, :, : self.output_width_px]
        return rows.index_select(2, self.source_cols)

    def _hold(self, labels: torch.Tensor, probabilities: torch.Tensor | None) -> None:
        """Queue a band of device tensors for the host: on CUDA copied into pinned memory
        without waiting, with an event on the copy's stream (the tensors' device's, which need
        not be the current device) that says when the copy is done."""
        if labels.device.type != "cuda":
            band = Band(labels.cpu().numpy(),
                        None if probabilities is None else probabilities.cpu().numpy())
            self.pending.append((None, band))
            return
        hosts = [None if tensor is None else
                 torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(
                     tensor, non_blocking=True)
                 for tensor in (labels, probabilities)]
        copied = torch.cuda.Event(blocking=True)  # a wait for it sleeps instead of spinning
        copied.record(torch.cuda.current_stream(labels.device))
        self.pending.append((copied, Band(*(None if host is None else host.numpy()
                                            for host in hosts))))

    def _background_band(self, end: int) -> None:
        """Hold the rows that no tile touched: background, probability 1 (255)."""
        rows = self._take_output_rows(end)
        if not len(rows):
            return
        shape = (len(rows), self.output_width_px)
        probabilities = None
        if self.keep_probabilities:
            probabilities = np.zeros((self.num_classes,) + shape, np.uint8)
            probabilities[self.background_index] = 255
        self.pending.append((None, Band(np.full(shape, self.background_index, np.uint8),
                                        probabilities)))


class _Outside:
    """Which output pixels lie outside a tissue mask, row range by row range, on the device."""

    def __init__(self, tissue_mask: np.ndarray, tissue_mpp: float,
                 output_shape_px: tuple[int, int], output_mpp: float, device):
        self.mask = torch.from_numpy(~tissue_mask).to(device)
        self.mask_rows = torch.from_numpy(output_index(output_shape_px[0], tissue_mpp, output_mpp,
                                                       tissue_mask.shape[0])).to(device)
        self.mask_cols = torch.from_numpy(output_index(output_shape_px[1], tissue_mpp, output_mpp,
                                                       tissue_mask.shape[1])).to(device)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """bool (stop - start, output width): output rows ``start .. stop`` outside the mask."""
        return self.mask.index_select(0, self.mask_rows[start:stop]).index_select(1, self.mask_cols)
