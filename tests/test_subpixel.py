"""The sub-pixel U-Net decoder against the model as trained: the same outputs."""

import copy

import pytest
import torch
from torch import nn

from biopsy.model import DecoderBlock, build_model
from biopsy.subpixel import SubpixelDecoderBlock, inference_unet, upsampling_kernels


def trained_like(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with BatchNorm statistics and affine weights far from identity."""
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.2, 0.2)
    return module.eval()


def test_upsampling_kernels_are_the_3x3_convolution_of_the_upsampled_image():
    torch.manual_seed(0)
    weight, image = torch.randn(5, 3, 3, 3), torch.randn(2, 3, 7, 9)
    expected = nn.functional.conv2d(nn.functional.interpolate(image, scale_factor=2.0), weight,
                                    padding=1)
    got = nn.functional.conv_transpose2d(image, upsampling_kernels(weight), stride=2, padding=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skip_channels", [0, 6])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("size", [(14, 18), (13, 18)])  # exactly 2x, and not (as the block was)
def test_decoder_block_gives_the_blocks_outputs(skip_channels, channels_last, size):
    torch.manual_seed(1)
    block = trained_like(DecoderBlock(8, skip_channels, 5))
    fast = SubpixelDecoderBlock(copy.deepcopy(block)).eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 7, 9).contiguous(memory_format=layout)
    skip = torch.randn(2, skip_channels, *size).contiguous(memory_format=layout) if skip_channels else None
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, skip, size), block(x, skip, size), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("height, width", [(96, 128), (100, 130)])
def test_inference_unet_gives_the_models_outputs_and_leaves_it_as_it_was(height, width):
    torch.manual_seed(2)
    model = trained_like(build_model("unet", 4, 3, encoder="resnet18",
                                     decoder_channels=[32, 16, 16, 8, 8]))
    fast = inference_unet(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert all(isinstance(block, SubpixelDecoderBlock) for block in fast.decoder)
    assert all(isinstance(block, DecoderBlock) for block in model.decoder)  # the caller's kept
    image = torch.rand(2, 3, height, width).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fast(image), model(image), atol=1e-4, rtol=1e-4)
