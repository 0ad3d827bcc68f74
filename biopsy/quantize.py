"""Int8 inference on the CPU: post-training static quantization of a checkpoint's model.

The model's activations are calibrated once, on tissue tiles of slides like those it will see
(:func:`calibrate`, the ``biopsy calibrate`` command): a histogram observer after each layer
records the values it meets. The observers' state is stored in the checkpoint (tensors under
``int8_calibration.``), so that :func:`quantized_model` rebuilds the same int8 model in well under
a second without data. Weights are quantized per output channel when the model is built.

Backend ``x86`` (oneDNN / fbgemm int8 kernels, using VNNI where the CPU has it). This uses
PyTorch's FX graph mode quantization (``torch.ao.quantization.quantize_fx``), deprecated
upstream in favour of torchao but present in every torch release this project admits.

    model, info = load_checkpoint(path)
    int8 = quantized_model(model, info, read_int8_calibration(path))
    class_map = segment_slide(slide, int8, info)          # on the CPU
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from biopsy.errors import CheckpointError
from biopsy.model import CALIBRATION_PREFIX, ModelInfo
from biopsy.slide import Slide

BACKEND = "x86"


def calibrate(model: nn.Module, info: ModelInfo, slides: list[Slide], tiles_per_slide: int = 32,
              batch_size: int = 8) -> tuple[dict[str, torch.Tensor], dict]:
    """Observer state (tensors named for the checkpoint) and its provenance, from up to
    ``tiles_per_slide`` tissue tiles of each slide, spread evenly over its tissue tiles and read
    as inference reads them (at the model's mpp, stain-normalised to its reference).

    Raises
    ------
    CheckpointError : no slide has tissue.
    """
    from biopsy.infer import tissue_tiles

    observed = _prepare(model, info.in_channels)
    tile_count = 0
    with torch.inference_mode():
        for slide in slides:
            _, tiles = tissue_tiles(slide, info)
            if not len(tiles):
                continue
            picks = np.unique(np.linspace(0, len(tiles) - 1, tiles_per_slide).round().astype(int))
            for first in range(0, len(picks), batch_size):
                batch = torch.stack([tiles[int(i)][0] for i in picks[first : first + batch_size]])
                observed(info.normalise(batch).contiguous())
                tile_count += len(batch)
    if not tile_count:
        raise CheckpointError("no tissue on the calibration slides; give slides with tissue")
    state = {CALIBRATION_PREFIX + name: tensor.detach().clone()
             for name, tensor in observed.state_dict().items() if "activation_post_process" in name}
    provenance = {"backend": BACKEND, "tiles": tile_count,
                  "slides": [str(slide.path) for slide in slides]}
    return state, provenance


def quantized_model(model: nn.Module, info: ModelInfo,
                    calibration: dict[str, torch.Tensor]) -> nn.Module:
    """The int8 model for the CPU, from ``model`` and its :func:`calibrate` state.

    Raises
    ------
    CheckpointError : the calibration was made for another model.
    """
    observed = _prepare(model, info.in_channels)
    state = {name.removeprefix(CALIBRATION_PREFIX): tensor for name, tensor in calibration.items()}
    expected = {name for name in observed.state_dict() if "activation_post_process" in name}
    if set(state) != expected:
        raise CheckpointError("the checkpoint's int8 calibration does not fit its model; "
                              "calibrate it again (biopsy calibrate)")
    observed.load_state_dict(state, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_fx
        return quantize_fx.convert_fx(observed)


def _prepare(model: nn.Module, in_channels: int) -> nn.Module:
    """A CPU copy of ``model`` with BatchNorm folded and an observer after each layer."""
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise CheckpointError(f"int8 inference needs an x86-64 CPU; this one offers "
                              f"{torch.backends.quantized.supported_engines}: drop --int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx

        torch.backends.quantized.engine = BACKEND
        model = copy.deepcopy(model).cpu().eval()
        example = torch.zeros(1, in_channels, 64, 64)
        return quantize_fx.prepare_fx(model, get_default_qconfig_mapping(BACKEND), (example,))
