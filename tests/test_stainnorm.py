"""Stain normalisation: amounts measured on slides, undone shifts, and inference that applies them."""

import multiprocessing

import numpy as np
import PIL.Image
import pytest
import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torch import nn

from biopsy import infer
from biopsy.infer import segment_slide, shift_stains, shifts_on_device
from biopsy.model import ModelInfo
from biopsy.pyramid import write_pyramid
from biopsy.restain import StainShift
from biopsy.slide import open_slide
from biopsy import slide as slide_module
from biopsy import stainnorm
from biopsy.stainnorm import MEASURE_MPP, normalising_shift, slide_stain_shift, stain_amounts
from biopsy.tissue import TissueMask

MPP = 0.5
BLOCK = int(MEASURE_MPP / MPP)  # stains constant over what one measured pixel covers


def stained(concentrations: np.ndarray) -> np.ndarray:
    """uint8 RGB of (h, w, 2) haematoxylin and eosin concentrations (optical density units)."""
    hed = np.concatenate([concentrations, np.zeros_like(concentrations[..., :1])], axis=-1)
    return np.rint(255 * np.exp(-(hed @ rgb_from_hed))).astype(np.uint8)


@pytest.fixture(scope="module")
def stains():
    rng = np.random.default_rng(3)
    coarse = np.stack([rng.uniform(0.2, 1.5, (100, 100)), rng.uniform(0.2, 1.0, (100, 100))], axis=-1)
    return np.kron(coarse, np.ones((BLOCK, BLOCK, 1)))  # 800 x 800 px at 0.5 µm/px


def write(path, image):
    glass = np.full((160, image.shape[1], 3), 255, np.uint8)
    image = np.concatenate([glass, image])
    write_pyramid(path, [image], image.shape[:2], MPP, style="generic", compression="zlib",
                  min_level_px=64)
    return open_slide(path)


def test_amounts_are_the_99th_percentiles_and_follow_a_shift(stains, tmp_path):
    original = write(tmp_path / "original.tif", stained(stains))
    expected = np.percentile(stains.reshape(-1, 2), 99, axis=0)
    assert stain_amounts(original) == pytest.approx(expected, abs=0.02)
    shifted = write(tmp_path / "shifted.tif", StainShift(haematoxylin=0.8, eosin=1.2).apply(stained(stains)))
    assert stain_amounts(shifted) == pytest.approx(expected * [0.8, 1.2], rel=0.02)
    back = normalising_shift(stain_amounts(shifted), stain_amounts(original))
    assert (back.haematoxylin, back.eosin) == pytest.approx((1 / 0.8, 1 / 1.2), rel=0.02)


def test_grey_glass_beside_the_tissue_does_not_count(stains, tmp_path):
    alone = write(tmp_path / "alone.tif", stained(stains))
    grey_glass = np.full((stains.shape[0], 2 * stains.shape[1], 3), 238, np.uint8)  # dusty, not white
    beside = write(tmp_path / "beside.tif", np.concatenate([stained(stains), grey_glass], axis=1))
    assert stain_amounts(beside) == pytest.approx(stain_amounts(alone), rel=0.02)


def test_bands_read_in_threads_measure_what_one_band_does(stains, tmp_path, monkeypatch):
    """Many bands, read and measured in threads each with its own handle: the same histogram as
    one band, with the tissue mask's rows matched to each band (grey glass below the tissue)."""
    grey_glass = np.full((stains.shape[0], stains.shape[1], 3), 238, np.uint8)
    slide = write(tmp_path / "below.tif", np.concatenate([stained(stains), grey_glass]))
    monkeypatch.setattr(stainnorm, "_BAND_PX", 10**6)
    monkeypatch.setattr(stainnorm, "_MAX_THREADS", 1)
    whole = stain_amounts(slide)
    monkeypatch.setattr(stainnorm, "_BAND_PX", 7)  # 30 bands
    monkeypatch.setattr(stainnorm, "_MAX_THREADS", 4)
    assert stain_amounts(slide) == whole
    alone = write(tmp_path / "alone.tif", stained(stains))
    assert whole == pytest.approx(stain_amounts(alone), rel=0.02)


def test_a_whole_decoded_image_is_measured_through_its_own_handle(stains, tmp_path, monkeypatch):
    """A snapshot's handle decodes the whole image: no copy per thread decodes it again."""
    tiled = write(tmp_path / "tiled.tif", stained(stains))
    PIL.Image.fromarray(stained(stains)).save(tmp_path / "snapshot.png")
    snapshot = open_slide(tmp_path / "snapshot.png", mpp=MPP)
    assert tiled.reads_regions and not snapshot.reads_regions
    opened = []
    monkeypatch.setattr(slide_module, "open_reader",
                        lambda path, opener=slide_module.open_reader: opened.append(path) or opener(path))
    monkeypatch.setattr(stainnorm, "_BAND_PX", 7)
    monkeypatch.setattr(stainnorm, "_MAX_THREADS", 4)
    assert stain_amounts(snapshot) == pytest.approx(stain_amounts(tiled), rel=0.02)
    assert snapshot.path not in opened and tiled.path in opened  # copies only of the tiled one


def test_glass_and_fluorescence_are_left_alone(tmp_path, shared_data, caplog):
    glass = write(tmp_path / "glass.tif", np.full((64, 64, 3), 255, np.uint8))
    assert stain_amounts(glass) is None
    assert slide_stain_shift(glass, [1.0, 1.0]) == StainShift()
    assert slide_stain_shift(glass, None) is None
    with open_slide(shared_data / "slides" / "vectra-multiplex-if.qptiff") as fluorescence:
        assert slide_stain_shift(fluorescence, [1.0, 1.0]) is None
    faint = normalising_shift((0.1, 0.8), (1.4780000000000002, 1.0), "faint.svs")  # nearly no
    assert (faint.haematoxylin, faint.eosin) == pytest.approx((4.0, 1.25))  # haematoxylin: x4
    assert ("faint.svs: stain amounts (0.1, 0.8) are far from the model's (1.48, 1): scaled by "
            "4, 1.25, the nearest within 0.25 to 4.0") in caplog.text  # the factors it applied


def dark_green_model(original) -> tuple[nn.Module, ModelInfo]:
    """A model that calls dark green (eosin-rich) pixels class 1, with ``original``'s stain
    amounts as its reference."""
    median_green = (np.median(stained_pixels(original)[..., 1]) / 255 - 0.5) / 0.25  # as it sees it
    model = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[1, 1] = -10.0  # class 1 where green is below the original's median
        model.bias.copy_(torch.tensor([0.0, 10 * median_green]))
    info = ModelInfo("toy", {}, ["background", "dark"], {"background": [0, 0, 0], "dark": [1, 1, 1]},
                     1.0, 64, 3, {"mean": [0.5] * 3, "std": [0.25] * 3},
                     stain_reference=list(stain_amounts(original)))
    return model.eval(), info


def stained_pixels(slide) -> np.ndarray:
    return slide.read(0, 0, slide.dimensions, slide.mpp[0])[160:]  # below the glass


WHOLE = TissueMask(np.ones((120, 100), bool), 4.0, (MPP, MPP))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_inference_undoes_a_stain_shift(stains, tmp_path, device):
    """A model that calls dark green (eosin-rich) pixels class 1 gives the original's map on a
    re-stained copy once the copy is brought to the original's amounts (on CUDA the shift is
    applied to the batches on the GPU, not in the workers)."""
    original = write(tmp_path / "original.tif", stained(stains))
    shifted = write(tmp_path / "shifted.tif", StainShift(haematoxylin=1.2, eosin=0.7).apply(stained(stains)))
    model, info = dark_green_model(original)
    reference = info.stain_reference

    def labels(slide, reference):
        info.stain_reference = reference
        return segment_slide(slide, model, info, workers=0, tissue=WHOLE, device=device,
                             bf16=False).labels[80:]

    truth = labels(original, None)
    assert 0.2 < truth.mean() < 0.8
    assert (labels(shifted, None) == truth).mean() < 0.95  # the shift moves ~10 % of the calls
    assert (labels(shifted, reference) == truth).mean() > 0.98


def test_a_stain_measured_while_the_workers_read_gives_their_map(stains, tmp_path, monkeypatch):
    """As on CUDA, here on the CPU: the workers start reading unshifted tiles, the stain is
    measured while they are alive and shifted on the batches; the map is the one the workers
    shifting it give (torch's shift against NumPy's: a grey level apart, rarely)."""
    original = write(tmp_path / "original.tif", stained(stains))
    shifted = write(tmp_path / "shifted.tif", StainShift(haematoxylin=1.2, eosin=0.7).apply(stained(stains)))
    model, info = dark_green_model(original)

    def segmented():
        return segment_slide(shifted, model, info, workers=1, tissue=WHOLE, bf16=False)

    in_workers = segmented()
    alive_workers = []
    measure = infer.slide_stain_shift
    monkeypatch.setattr(infer, "slide_stain_shift", lambda *args: alive_workers.append(
        len(multiprocessing.active_children())) or measure(*args))
    monkeypatch.setattr(infer, "measures_stain_later", lambda device: True)
    monkeypatch.setattr(infer, "shifts_on_device", lambda stain, device: not stain.is_identity)
    children = len(multiprocessing.active_children())  # (none, unless a test before leaked one)
    later = segmented()
    assert alive_workers == [children + 1]
    assert later.stain_factors == in_workers.stain_factors != (1.0, 1.0)
    assert (later.labels == in_workers.labels).mean() > 0.999


def test_a_shift_applied_to_tensors_gives_the_same_pixels(real_glomeruli):
    """The GPU's stain shift (torch) against the workers' (NumPy), on real images, here on the CPU:
    the same float32 steps, so at most a last-bit difference of log or exp moves a value by one."""
    paths = sorted((real_glomeruli / "images").glob("*.jpg"))[::20]
    rgb = np.stack([np.asarray(PIL.Image.open(path).convert("RGB")) for path in paths])
    for shift in (StainShift(haematoxylin=1.3, eosin=0.8), StainShift(haematoxylin=0.6, eosin=2.1)):
        expected = shift.apply(rgb)
        matrix = torch.tensor(shift.density_matrix(), dtype=torch.float32)
        difference = np.abs(shift_stains(torch.from_numpy(rgb), matrix).numpy() - expected.astype(int))
        assert difference.max() <= 1 and (difference == 0).mean() > 0.9999
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert shifts_on_device(StainShift(eosin=1.2), cuda) and not shifts_on_device(None, cuda)
    assert not shifts_on_device(StainShift(eosin=1.2), cpu)  # shifted as the tiles are read
    assert not shifts_on_device(StainShift(), cuda)  # left exact, in the workers (a copy)
    assert not shifts_on_device(StainShift(hue_deg=10), cuda)  # hue turns stay in the workers


def test_band_histograms_match_deconvolution_pixel_by_pixel(real_glomeruli):
    """The tables-and-transform histogram against the deconvolution written out in float64 and
    binned by NumPy, on real images: the same pixels counted, and at most 1 in 5,000 a bin apart
    (a concentration on a bin edge, float32 against float64)."""
    paths = sorted((real_glomeruli / "images").glob("*.jpg"))[::25]
    for path in paths:
        rgb = np.asarray(PIL.Image.open(path).convert("RGB"))
        inside = np.zeros(rgb.shape[:2], bool)
        inside[100:-100, 200:] = True
        density = -np.log(np.maximum(rgb[inside], 1) / 255)
        hed = density[density.sum(axis=1) > stainnorm.TISSUE_DENSITY] @ hed_from_rgb
        expected = np.stack([np.histogram(np.clip(hed[:, stain], 0, 4), np.linspace(0, 4, 4001))[0]
                             for stain in range(2)])
        counts = stainnorm._band_counts(rgb, inside)
        assert (counts.sum(axis=1) == expected.sum(axis=1)).all()
        assert np.abs(counts - expected).sum() / 2 <= expected.sum() / 5000, path.name
