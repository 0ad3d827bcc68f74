"""Pixel-size search: the confidence it ranks by, against a whole-image computation; the choice it
makes; the commands and the evaluation that use it."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from biopsy.mppsearch import check_factors, most_confident_mpp
from biopsy.tissue import detect_tissue
from inference_models import model_info, write_slide

FACTORS = (0.71, 1.0, 1.41)


@pytest.fixture(scope="module")
def blocky_slide(tmp_path_factory):
    """Glass with a pink core of 7 x 7 px blocks of two shades: under a coarser reading (a smaller
    factor) neighbouring blocks blend into one shade."""
    image = np.full((768, 1024, 3), 240, np.uint8)
    rows, cols = np.indices((256, 640))
    light = ((rows // 7 + cols // 7) % 2).astype(bool)
    image[256:512, 192:832] = np.where(light[..., None], [235, 170, 205], [175, 80, 135])
    return write_slide(tmp_path_factory.mktemp("blocks") / "blocks.tif", image, mpp=0.5)


class _SureAwayFromGrey(nn.Module):
    """Two classes; the first wins more surely the further a pixel's red is from the mid shade."""

    def forward(self, x):
        return torch.cat([8 * x[:, :1] ** 2, torch.zeros_like(x[:, :1])], dim=1)


def _info():
    return model_info(2, mpp=2.0, patch_px=64, mean=205 / 255, std=0.25)


def _whole_image_confidence(slide, model, info) -> float:
    """The mean largest probability over the slide's tissue, the model (pixel by pixel) run on
    the whole slide read at once at the model's mpp."""
    width, height = (round(size * mpp / info.input_mpp)
                     for size, mpp in zip(slide.dimensions, slide.mpp))
    image = torch.from_numpy(slide.read(0, 0, (width, height), info.input_mpp))[None]
    with torch.no_grad():
        largest = model(info.normalise(image)).softmax(1).amax(1)[0].numpy()
    tissue = detect_tissue(slide)
    mask_height, mask_width = tissue.mask.shape  # the last pixels may round past the mask
    rows = np.minimum((np.arange(height) + 0.5) * info.input_mpp // tissue.mpp, mask_height - 1)
    cols = np.minimum((np.arange(width) + 0.5) * info.input_mpp // tissue.mpp, mask_width - 1)
    return float(largest[tissue.mask[np.ix_(rows.astype(int), cols.astype(int))]].mean())


def test_confidence_is_the_mean_over_tissue_of_the_largest_probability(blocky_slide):
    model, info = _SureAwayFromGrey(), _info()
    choice = most_confident_mpp(blocky_slide, model, info, FACTORS, max_tiles=1000)
    for factor in FACTORS:
        expected = _whole_image_confidence(blocky_slide.with_mpp_scaled(factor), model, info)
        assert choice.confidence[factor] == pytest.approx(expected, abs=2e-3)


def test_the_search_keeps_the_factor_under_which_the_model_is_surest(blocky_slide):
    """Blocks blend less the finer they are read: the largest factor, whatever the order."""
    model, info = _SureAwayFromGrey(), _info()
    for factors in (FACTORS, FACTORS[::-1], (1.0, 0.5)):
        choice = most_confident_mpp(blocky_slide, model, info, factors)
        assert choice.factor == max(factors)
        assert choice.mpp == pytest.approx((0.5 * max(factors),) * 2)
        assert choice.confidence[max(factors)] > choice.confidence[min(factors)] + 0.01
    # fewer tiles, evenly spread, still rank the factors alike
    assert most_confident_mpp(blocky_slide, model, info, FACTORS, max_tiles=3).factor == 1.41


def test_a_factor_that_leaves_the_slide_range_is_not_tried(blocky_slide):
    """0.5 µm/px x 4 is 2, in range; 6 µm/px x 4 would be 24, outside (0.05 to 20)."""
    model, info = _SureAwayFromGrey(), _info()
    assert most_confident_mpp(blocky_slide, model, info, (1.0, 4.0)).confidence[4.0] is not None
    coarse = copy.copy(blocky_slide)
    coarse.mpp = (6.0, 6.0)
    choice = most_confident_mpp(coarse, model, info, (1.0, 4.0))
    assert choice.confidence[4.0] is None and choice.confidence[1.0] is not None
    assert choice.factor == 1.0


def test_without_tissue_the_pixel_size_stays(tmp_path):
    glass = write_slide(tmp_path / "glass.tif", np.full((256, 256, 3), 240, np.uint8), mpp=0.5)
    choice = most_confident_mpp(glass, _SureAwayFromGrey(), _info(), FACTORS)
    assert choice.factor == 1.0 and choice.mpp == (0.5, 0.5)
    assert choice.confidence == {factor: None for factor in FACTORS}


@pytest.mark.parametrize("factors", [(), (0.0, 1.0), (1.0, float("nan")), (-1.0,), (1.0, 1e9),
                                     (0.2,)])
def test_factors_must_be_within_4x_either_way(factors):
    with pytest.raises(ValueError, match="from 0.25 to 4"):
        check_factors(factors)


def test_segment_command_segments_at_the_chosen_pixel_size(blocky_slide, tmp_path):
    from biopsy.cli import main
    from biopsy.infer import segment_slide
    from biopsy.labelmap import read_label_map
    from biopsy.model import build_model, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    arguments = {"encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]}
    info = _info()
    info.architecture, info.arguments = "unet", arguments
    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(checkpoint, build_model("unet", 2, 3, **arguments), info)
    out = tmp_path / "out"
    assert main(["segment", str(blocky_slide.path), "--model", str(checkpoint), "--out", str(out),
                 "--workers", "0", "--mpp-search", "0.71", "1", "1.41"]) == 0
    record = json.loads((out / "segment.json").read_text())
    model, info = load_checkpoint(checkpoint)
    chosen = most_confident_mpp(blocky_slide, model.eval(), info, FACTORS)
    assert record["options"]["mpp_search"] == {
        "factors": list(FACTORS), "factor": chosen.factor,
        "confidence": [pytest.approx(chosen.confidence[f]) for f in FACTORS]}
    assert chosen.factor != 1.0  # so the map below is not the one of the recorded pixel size
    assert record["slide"]["mpp"] == pytest.approx(list(chosen.mpp))
    expected = segment_slide(blocky_slide.with_mpp_scaled(chosen.factor), model, info, workers=0)
    np.testing.assert_array_equal(read_label_map(out / "labels.ome.tif").labels, expected.labels)


def test_a_bad_factor_is_refused_by_the_commands(blocky_slide, tmp_path, capsys):
    from biopsy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(blocky_slide.path), "--model", "x.safetensors", "--out",
              str(tmp_path), "--mpp-search", "1", "-0.5"])
    assert exit_info.value.code == 2 and "not a number from 0.25 to 4" in capsys.readouterr().err
