"""Segmentation model architectures and the checkpoint format shared by training and inference.

A checkpoint is one ``.safetensors`` file: the weights, and under the string-metadata key
``biopsy`` a JSON object (:class:`ModelInfo`) with everything inference needs to use the weights
correctly: architecture and its arguments, class names and colours, input mpp, patch size, input
channels and their normalisation, plus the training config, validation metrics and code version for
provenance. Nothing is ever unpickled.
"""

import functools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet

from biopsy import __version__
from biopsy.atomic import atomic_path
from biopsy.decision import check_glomerulus_threshold
from biopsy.errors import CheckpointError
from biopsy.provenance import file_sha256

CHECKPOINT_FORMAT = "biopsy.checkpoint/1"
CALIBRATION_PREFIX = "int8_calibration."  # checkpoint tensors of biopsy.quantize, not weights
# The bundled model (all SCORING.md classes; synthetic PAS, H&E and trichrome slides; recipe in
# configs/train/synthetic-multistain-polish.yaml).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "default.safetensors"
METADATA_KEY = "biopsy"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNET_ENCODERS = {
    "resnet18": (resnet.resnet18, (64, 64, 128, 256, 512)),
    "resnet34": (resnet.resnet34, (64, 64, 128, 256, 512)),
    "resnet50": (resnet.resnet50, (64, 256, 512, 1024, 2048)),
    "resnet101": (resnet.resnet101, (64, 256, 512, 1024, 2048)),
}


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """Upsample by 2, concatenate the skip features, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.skip_channels = in_channels, skip_channels
        self.convs = nn.Sequential(
            _conv_bn_relu(in_channels + skip_channels, out_channels),
            _conv_bn_relu(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class ResNetUNet(nn.Module):
    """U-Net with a torchvision ResNet encoder; logits at the input resolution.

    Any input size works (skips are matched by interpolation), though sizes divisible by 32 avoid
    resampling.
    """

    def __init__(self, encoder: str, num_classes: int, in_channels: int,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
                 encoder_weights: str | Path | None = None):
        super().__init__()
        if encoder not in RESNET_ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(RESNET_ENCODERS)}")
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries, got {list(decoder_channels)}")
        if not all(isinstance(c, int) and c >= 1 for c in decoder_channels):
            raise ValueError(f"decoder_channels must be whole numbers >= 1, got {list(decoder_channels)}")
        constructor, encoder_channels = RESNET_ENCODERS[encoder]
        backbone = constructor(weights=None)
        if encoder_weights is not None:
            _load_encoder_weights(backbone, Path(encoder_weights))
        backbone.conv1 = _adapt_first_conv(backbone.conv1, in_channels)
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu)
        self.pool = backbone.maxpool
        self.layers = nn.ModuleList([backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4])
        skips = encoder_channels[-2::-1] + (0,)  # stride 16, 8, 4, 2 features, then none
        inputs = (encoder_channels[-1],) + tuple(decoder_channels[:-1])
        self.decoder = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(inputs, skips, decoder_channels)
        )
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        y = self.pool(features[0])
        for layer in self.layers:
            y = layer(y)
            features.append(y)
        skips = features[-2::-1] + [None]
        sizes = [f.shape[-2:] for f in features[-2::-1]] + [x.shape[-2:]]
        y = features[-1]
        for block, skip, size in zip(self.decoder, skips, sizes):
            y = block(y, skip, size)
        return self.head(y)


def _load_encoder_weights(backbone: nn.Module, path: Path) -> None:
    """Load a local torchvision ResNet state dict (e.g. ImageNet weights); never downloads."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: cannot read encoder weights ({error}); give a torchvision "
                              "ResNet state dict saved with torch.save") from error
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: not weights of this ResNet (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The first convolution for ``in_channels`` inputs, reusing RGB weights where present."""
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=False)
    with torch.no_grad():
        mean_filter = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean_filter.repeat(1, in_channels, 1, 1) * (3 / in_channels))
    return new


ARCHITECTURES = {"unet": ResNetUNet}


def build_model(architecture: str, num_classes: int, in_channels: int, **arguments) -> nn.Module:
    """A freshly initialised model, e.g. ``build_model("unet", 11, 3, encoder="resnet34")``.

    ``encoder_weights`` (a local file) initialises the encoder; nothing is downloaded.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    if "decoder_channels" in arguments:
        arguments = {**arguments, "decoder_channels": tuple(arguments["decoder_channels"])}
    return ARCHITECTURES[architecture](num_classes=num_classes, in_channels=in_channels, **arguments)


@dataclass
class ModelInfo:
    """What a checkpoint says about its weights; the JSON under the metadata key ``biopsy``."""

    architecture: str
    arguments: dict
    class_names: list[str]
    class_colours: dict[str, list[int]]
    input_mpp: float
    patch_size_px: int
    in_channels: int
    normalisation: dict[str, list[float]]  # {"mean": [...], "std": [...]} for inputs in 0..1
    fluorescence: bool = False  # trained on fluorescence channels, not brightfield
    stain_reference: list[float] | None = None  # (haematoxylin, eosin) amounts: biopsy.stainnorm
    glomerulus_threshold: float | None = None  # decide glomerulus first: biopsy.decision
    int8_calibration: dict | None = None  # provenance of the stored one: biopsy.quantize
    training_config: dict = field(default_factory=dict)
    validation_metrics: dict = field(default_factory=dict)
    code_version: str = __version__
    sha256: str | None = None  # of the checkpoint file; set on load, not stored in it

    def to_json(self) -> str:
        data = asdict(self)
        del data["sha256"]
        return json.dumps({"format": CHECKPOINT_FORMAT, **data}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "ModelInfo":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{source}: metadata is not JSON ({error})") from error
        if not isinstance(data, dict) or data.pop("format", None) != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{source}: not a {CHECKPOINT_FORMAT} checkpoint")
        data.pop("sha256", None)
        try:
            return cls(**data)
        except TypeError as error:
            raise CheckpointError(f"{source}: malformed checkpoint metadata ({error})") from error

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """Model input from a uint8 batch (N, H, W, C): float (N, C, H, W), channels_last memory.

        Runs on the batch's device; move the uint8 batch to the GPU first (4x less to copy).
        """
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != self.in_channels:
            raise ValueError(f"expected uint8 (N, H, W, {self.in_channels}), got "
                             f"{batch.dtype} {tuple(batch.shape)}")
        mean, scale = _normalisation_constants(tuple(self.normalisation["mean"]),
                                               tuple(self.normalisation["std"]), batch.device)
        return (batch - mean).mul_(scale).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _normalisation_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) in 0-255 units on ``device``, made once: made per batch, their copy from
    pageable memory would wait for the device to finish its queued work (the CPU could not run
    ahead of the GPU). Ordinary tensors even when first asked for under inference mode."""
    with torch.inference_mode(False):
        mean_tensor = torch.tensor(mean, device=device) * 255
        return mean_tensor, 1 / (torch.tensor(std, device=device) * 255)


def with_glomerulus_threshold(info: ModelInfo, threshold: float | None, source: str | Path
                              ) -> ModelInfo:
    """``info`` deciding glomerulus first at ``threshold`` (:mod:`biopsy.decision`); ``info``
    itself when ``threshold`` is None.

    Raises
    ------
    CheckpointError : the threshold is not in (0, 1), or the model's classes leave nothing to
        decide (``source`` names the checkpoint).
    """
    if threshold is None:
        return info
    try:
        check_glomerulus_threshold(threshold, info.class_names)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    return replace(info, glomerulus_threshold=threshold)


def save_checkpoint(path: str | Path, model: nn.Module, info: ModelInfo,
                    half_precision: bool = False) -> None:
    """Write ``model``'s weights and ``info`` as one safetensors file (complete or absent).

    ``half_precision`` stores convolution weights as float16 (half the size; loaded back as the
    model's dtype); normalisation statistics and biases stay float32.
    """
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if half_precision and tensor.is_floating_point() and tensor.ndim >= 2:
            tensor = tensor.half()
        tensors[name] = tensor
    _write(path, tensors, replace(info, int8_calibration=None))  # new weights: none fits them


def save_int8_calibration(checkpoint: str | Path, out: str | Path,
                          calibration: dict[str, torch.Tensor], provenance: dict) -> None:
    """Copy ``checkpoint`` to ``out`` (the same file is fine) with ``calibration`` (tensors named
    ``int8_calibration.*``: :func:`biopsy.quantize.calibrate`) in place of any it had; the
    weights are copied as stored, and ``provenance`` goes to ``ModelInfo.int8_calibration``."""
    checkpoint = Path(checkpoint)
    info = read_model_info(checkpoint)
    info.int8_calibration = provenance
    weights = _open(checkpoint, lambda f: {k: f.get_tensor(k) for k in f.keys()
                                           if not k.startswith(CALIBRATION_PREFIX)})
    _write(out, weights | calibration, info)


def _write(path: str | Path, tensors: dict[str, torch.Tensor], info: ModelInfo) -> None:
    with atomic_path(path) as temporary:
        try:
            save_file(tensors, str(temporary), metadata={METADATA_KEY: info.to_json()})
        except SafetensorError as error:  # an unwritable folder, a full disk
            raise CheckpointError(f"{path}: cannot write the checkpoint ({error})") from None
        temporary.chmod(0o644)  # safetensors creates it owner-only


def read_model_info(path: str | Path) -> ModelInfo:
    """The metadata of a checkpoint, without loading its weights."""
    path = Path(path)
    metadata = _open(path, lambda f: f.metadata())
    if not metadata or METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: safetensors file without '{METADATA_KEY}' metadata; "
                              "not a biopsy checkpoint")
    info = ModelInfo.from_json(metadata[METADATA_KEY], str(path))
    info.sha256 = file_sha256(path)
    return info


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """The model (in eval mode, on ``device``) and its :class:`ModelInfo`."""
    path = Path(path)
    info = read_model_info(path)
    try:
        model = build_model(info.architecture, len(info.class_names), info.in_channels, **info.arguments)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot build {info.architecture} {info.arguments} ({error})") from error
    state = _open(path, lambda f: {k: f.get_tensor(k) for k in f.keys()
                                   if not k.startswith(CALIBRATION_PREFIX)})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit {info.architecture} ({first_line})") from error
    return model.to(device).eval(), info


def read_int8_calibration(path: str | Path) -> dict[str, torch.Tensor]:
    """The int8 calibration stored in a checkpoint (:mod:`biopsy.quantize`).

    Raises
    ------
    CheckpointError : the checkpoint has none.
    """
    path = Path(path)
    calibration = _open(path, lambda f: {k: f.get_tensor(k) for k in f.keys()
                                         if k.startswith(CALIBRATION_PREFIX)})
    if not calibration:
        raise CheckpointError(f"{path}: no int8 calibration in this checkpoint; add one with "
                              f"`biopsy calibrate --model {path} --out CKPT SLIDE...`")
    return calibration


def _open(path: Path, read):
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({error})") from error
