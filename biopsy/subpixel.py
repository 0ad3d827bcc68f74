"""The U-Net for inference: BatchNorm folded, each decoder block's upsampling done sub-pixel.

A decoder block upsamples its input 2x (nearest), concatenates the skip features and runs a 3x3
convolution. On the upsampled image, the 3x3 window of an output pixel of parity (a, b) (row
and column even or odd) covers only 2x2 input pixels, each seen through the sum of the taps
that fall on it. So that convolution is, per parity, a 2x2 convolution of the input at its own
resolution: 4 of the 9 taps, 16/36 of the multiply-adds. The four parities are computed as one
convolution (four times the output channels) and interleaved into the output, to which the skip
features' own 3x3 convolution is added. No upsampled or concatenated tensor is made. The result
equals the original up to float rounding (relative error ~1e-6).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval

from biopsy.model import DecoderBlock, ResNetUNet


def inference_unet(model: ResNetUNet) -> ResNetUNet:
    """A copy of ``model`` (in eval mode) with BatchNorm folded into the convolutions and each
    decoder block a :class:`SubpixelDecoderBlock`."""
    model = copy.deepcopy(model).eval()
    model.stem = fuse(model.stem)
    model.layers = nn.ModuleList(fuse(layer) for layer in model.layers)
    model.decoder = nn.ModuleList(SubpixelDecoderBlock(block) for block in model.decoder)
    return model


def parity_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) weights of a 3x3 convolution of an image upsampled 2x (nearest), as
    (4 * C_out, C_in, 2, 2) weights on the image itself, parities (0, 0), (0, 1), (1, 0), (1, 1)
    in turn. Parity 0 along an axis sees input pixels (p - 1, p) through taps (0, 1 + 2), parity
    1 sees (p, p + 1) through taps (0 + 1, 2)."""
    def halves(taps: torch.Tensor, axis: int) -> list[torch.Tensor]:
        first, middle, last = taps.unbind(axis)
        return [torch.stack([first, middle + last], axis), torch.stack([first + middle, last], axis)]

    return torch.cat([kernel for rows in halves(weight, 2) for kernel in halves(rows, 3)])


class SubpixelDecoderBlock(nn.Module):
    """A :class:`~biopsy.model.DecoderBlock` (eval mode) with its BatchNorm folded and its first
    convolution done sub-pixel where the input is upsampled exactly 2x (else as the block was)."""

    def __init__(self, block: DecoderBlock):
        super().__init__()
        (conv, norm, relu), rest = block.convs
        self.first = fuse_conv_bn_eval(conv, norm)  # on the upsampled and concatenated input
        self.after = nn.Sequential(relu, fuse(rest))
        up, skip = block.in_channels, block.skip_channels
        self.out_channels = conv.out_channels
        weight, bias = self.first.weight.detach(), self.first.bias.detach()
        self.parities = nn.Conv2d(up, 4 * self.out_channels, 2, padding=1, bias=not skip)
        self.parities.weight = nn.Parameter(parity_kernels(weight[:, :up]))
        self.skip = nn.Conv2d(skip, self.out_channels, 3, padding=1) if skip else None
        if self.skip is not None:
            self.skip.weight = nn.Parameter(weight[:, up:].clone())
            self.skip.bias = nn.Parameter(bias.clone())
        else:
            self.parities.bias = nn.Parameter(bias.repeat(4))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        height, width = x.shape[-2:]
        if tuple(size) != (2 * height, 2 * width):
            x = F.interpolate(x, size=size, mode="nearest")
            return self.after(self.first(x if skip is None else torch.cat([x, skip], dim=1)))
        return self.after(self._upsampled_convolution(x, skip))

    def _upsampled_convolution(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """The first convolution for an input upsampled 2x: the four parities' 2x2 convolutions
        (zero-padded by one pixel: (h + 1, w + 1) outputs, each parity a shifted crop of them)
        interleaved, channels last, into the skip's convolution (or an empty output)."""
        batch, _, height, width = x.shape
        channels = self.out_channels
        parities = self.parities(x).permute(0, 2, 3, 1)  # (n, h + 1, w + 1, 4C)
        if self.skip is None:
            out = parities.new_empty((batch, height, 2, width, 2, channels))
        else:  # (n, 2h, 2w, C) seen as (n, h, 2, w, 2, C): [:, p, a, q, b] is pixel (2p+a, 2q+b)
            out = self.skip(skip).permute(0, 2, 3, 1).contiguous().view(
                batch, height, 2, width, 2, channels)
        for index, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            crop = parities[:, a : a + height, b : b + width, index * channels : (index + 1) * channels]
            if self.skip is None:
                out[:, :, a, :, b] = crop
            else:
                out[:, :, a, :, b] += crop
        return out.view(batch, 2 * height, 2 * width, channels).permute(0, 3, 1, 2)
