"""Model architectures and the checkpoint format (biopsy.model)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from biopsy.errors import CheckpointError
from biopsy.model import (
    CHECKPOINT_FORMAT,
    ModelInfo,
    build_model,
    load_checkpoint,
    read_model_info,
    save_checkpoint,
)
from biopsy.provenance import file_sha256


def _info(**changes) -> ModelInfo:
    values = dict(architecture="unet", arguments={"encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]},
                  class_names=["background", "tissue", "tuft"],
                  class_colours={"background": [255, 255, 255], "tissue": [230, 200, 160], "tuft": [250, 150, 200]},
                  input_mpp=1.0, patch_size_px=64, in_channels=3,
                  normalisation={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
                  training_config={"seed": 3}, validation_metrics={"all": {"mean_dice": 0.5}})
    values.update(changes)
    return ModelInfo(**values)


def _model(info: ModelInfo) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(info.architecture, len(info.class_names), info.in_channels, **info.arguments)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode differs from init
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("encoder,in_channels,size", [("resnet18", 3, 64), ("resnet34", 1, 70),
                                                      ("resnet50", 4, 64)])
def test_unet_gives_logits_at_input_size(encoder, in_channels, size):
    model = build_model("unet", 5, in_channels, encoder=encoder).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size + 32))
    assert logits.shape == (2, 5, size, size + 32)


def test_unknown_architecture_or_encoder_is_refused():
    with pytest.raises(ValueError, match="architecture"):
        build_model("segformer", 3, 3)
    with pytest.raises(ValueError, match="encoder"):
        build_model("unet", 3, 3, encoder="vgg16")


def test_local_encoder_weights_are_loaded(tmp_path):
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("unet", 3, 3, encoder="resnet18", encoder_weights=path)
    assert torch.equal(model.stem[0].weight, reference.conv1.weight)
    assert torch.equal(model.layers[3][1].conv2.weight, reference.layer4[1].conv2.weight)
    one_channel = build_model("unet", 3, 1, encoder="resnet18", encoder_weights=path)
    assert torch.allclose(one_channel.stem[0].weight[:, 0], reference.conv1.weight.sum(dim=1), atol=1e-6)


def test_checkpoint_round_trip_keeps_outputs_and_metadata(tmp_path):
    info = _info(glomerulus_threshold=0.7)
    model = _model(info)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, info)
    loaded, loaded_info = load_checkpoint(path)
    batch = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(info.normalise(batch)), loaded(loaded_info.normalise(batch)))
    assert loaded_info.sha256 == file_sha256(path)
    loaded_info.sha256 = None
    assert loaded_info == info
    assert not loaded.training
    assert read_model_info(path).class_names == ["background", "tissue", "tuft"]


def test_half_precision_checkpoint_is_smaller_and_close(tmp_path):
    info = _info()
    model = _model(info)
    save_checkpoint(tmp_path / "full.safetensors", model, info)
    save_checkpoint(tmp_path / "half.safetensors", model, info, half_precision=True)
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (tmp_path / "full.safetensors").stat().st_size
    loaded, _ = load_checkpoint(tmp_path / "half.safetensors")
    assert next(loaded.parameters()).dtype == torch.float32
    x = info.normalise(torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=2e-2, rtol=2e-2)


def test_normalise_matches_the_definition():
    info = _info()
    batch = torch.randint(0, 256, (2, 8, 9, 3), dtype=torch.uint8)
    expected = (batch.float() / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.3])
    assert torch.allclose(info.normalise(batch), expected.permute(0, 3, 1, 2), atol=1e-5)
    with pytest.raises(ValueError):
        info.normalise(batch.float())


def test_files_of_another_format_raise_checkpoint_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"biopsy": json.dumps({"format": "x/9"})})
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"w": torch.zeros(2)}, str(mismatched), metadata={"biopsy": _info().to_json()})
    for path, message in [(junk, "not a safetensors"), (bare, "not a biopsy checkpoint"),
                          (other, CHECKPOINT_FORMAT), (mismatched, "do not fit"),
                          (tmp_path / "missing.safetensors", "not found")]:
        with pytest.raises(CheckpointError, match=message) as caught:
            load_checkpoint(path)
        assert str(path) in str(caught.value)
