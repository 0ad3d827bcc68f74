"""Training pipeline: loss, the loop (resume, DDP, fine-tuning); configs and cases are tested in
test_training_data.py, the annotation readers in test_annotations.py."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from biopsy.errors import CheckpointError, ConfigError
from biopsy.model import load_checkpoint, read_model_info
from cuda_syncs import cuda_syncs
from glomeruli_dataset import config_dict, make_dataset
from training.cases import find_slides
from training.config import config_from_dict
from training.evaluate import evaluate_checkpoint
from training.__main__ import main as training_main
from training.ema import ExponentialAverage
from training import state
from training.loop import fit
from training.losses import DiceCrossEntropyLoss, cross_entropy, soft_dice

REPO = Path(__file__).resolve().parents[1]

def losses(output: Path) -> list[float]:
    with open(output / "log.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


# --- loss and evaluation ---------------------------------------------------------------------

def test_loss_ignores_unlabelled_pixels():
    target = torch.tensor([[[0, 1], [255, 255]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = 20.0
    changed = logits.clone()
    changed[0, :, 1, :] = torch.randn(2, 2)  # ignored pixels
    loss = DiceCrossEntropyLoss()
    assert float(loss(logits, target)) == pytest.approx(float(loss(changed, target)))
    assert soft_dice(logits, target, 255).min() > 0.99


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_is_torchs_weighted_mean_over_labelled_pixels(weighted):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, generator=generator)
    target = torch.randint(0, 3, (2, 5, 7), generator=generator)
    target[0, :2] = 255
    weights = torch.tensor([0.5, 1.0, 3.0]) if weighted else None
    reference = F.cross_entropy(logits, target, weight=weights, ignore_index=255)
    ours = cross_entropy(logits, target, weights, 255)
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)
    assert float(cross_entropy(logits, torch.full_like(target, 255), weights, 255)) == 0.0


# --- the loop --------------------------------------------------------------------------------

def test_few_steps_reduce_the_loss_and_write_a_checkpoint(dataset_root, tmp_path):
    settings = config_dict(dataset_root, tmp_path / "run", steps=24, validate_every=24)
    settings["model"]["glomerulus_threshold"] = 0.6
    config = config_from_dict(settings, "test")
    metrics = fit(config)
    history = losses(tmp_path / "run")
    assert len(history) == 24 and np.mean(history[-4:]) < 0.8 * np.mean(history[:4])
    model, info = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert info.class_names == ["tissue", "tuft", "sclerosis"] and info.glomerulus_threshold == 0.6
    assert info.validation_metrics["metrics"] == metrics
    assert info.validation_metrics["validation_cases"] == ["case2"]
    assert set(metrics) == {"all", "PAS", "PASM"} and metrics["all"]["glomerulus_count"] == 4
    assert (tmp_path / "run" / "validation.csv").exists() and (tmp_path / "run" / "config.yaml").exists()
    assert evaluate_checkpoint(config, tmp_path / "run" / "last.safetensors") == metrics
    everything = evaluate_checkpoint(config, tmp_path / "run" / "last.safetensors", data_root=dataset_root)
    assert everything["all"]["glomerulus_count"] == 12  # --data: every annotated image
    # A glomerulus threshold chosen with eval, then stored in a copy with export, decides alike.
    last, marked = tmp_path / "run" / "last.safetensors", tmp_path / "marked.safetensors"
    assert training_main(["export", str(last), str(marked), "--glomerulus-threshold", "0.7"]) == 0
    assert read_model_info(marked).glomerulus_threshold == 0.7
    assert evaluate_checkpoint(config, marked) == evaluate_checkpoint(config, last,
                                                                      glomerulus_threshold=0.7)


@pytest.mark.gpu
def test_cuda_training_with_bf16_workers_and_compile_reduces_the_loss(dataset_root, tmp_path):
    """The GPU path: bf16 autocast, channels_last, pinned worker batches and torch.compile."""
    settings = config_dict(dataset_root, tmp_path / "run", steps=24, validate_every=24, workers=2,
                           compile=True, precision="auto")
    metrics = fit(config_from_dict(settings, "test"))
    history = losses(tmp_path / "run")
    assert len(history) == 24 and np.mean(history[-4:]) < 0.8 * np.mean(history[:4])
    assert metrics["all"]["glomerulus_count"] == 4
    load_checkpoint(tmp_path / "run" / "last.safetensors", "cpu")  # no compile-wrapper key names


@pytest.mark.gpu
def test_training_steps_never_wait_for_the_gpu(dataset_root, tmp_path):
    """The host queues step after step (bf16, EMA, gradient clipping) without waiting for the
    device: twice the steps call no more synchronising operations (logging, validation and
    saving happen once, at the last step)."""
    def run(steps: int) -> int:
        settings = config_dict(dataset_root, tmp_path / f"run{steps}", steps=steps, log_every=100,
                               precision="auto", ema_decay=0.99)
        settings["optim"]["grad_clip_norm"] = 1.0
        return cuda_syncs(fit, config_from_dict(settings, "test"))

    run(2)  # once-only set-up (cached constants, cuDNN's choices)
    assert run(3) == run(6)


def test_resume_continues_the_loss_curve_exactly(dataset_root, tmp_path):
    """On a GPU too: ``deterministic`` keeps CUDA's kernels from summing in a varying order."""
    settings = {"ema_decay": 0.99, "deterministic": True}
    whole = config_from_dict(config_dict(dataset_root, tmp_path / "whole", **settings), "test")
    fit(whole)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    cut = config_from_dict(config_dict(dataset_root, tmp_path / "cut", **settings), "test")
    fit(cut, stop_at=3)
    assert len(losses(tmp_path / "cut")) == 3
    fit(cut, resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    resumed, _ = load_checkpoint(tmp_path / "cut" / "last.safetensors")  # the EMA weights
    uncut, _ = load_checkpoint(tmp_path / "whole" / "last.safetensors")
    for (name, a), b in zip(resumed.state_dict().items(), uncut.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_resume_in_another_precision_is_a_warning(tmp_path, caplog):
    """precision auto resolves by machine: a run saved in bf16 on a CPU with bf16 instructions
    and resumed on one without goes on in float32, its loss curve no longer continued exactly."""
    model = torch.nn.Linear(4, 2)
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0)
    state.save_state(tmp_path / "state.pt", model, None, optimiser, scheduler, 1, 0.5, {}, "bf16", {})
    with caplog.at_level("WARNING"):
        state.load_state(tmp_path / "state.pt", model, None, optimiser, scheduler, "cpu", {}, "bf16", {})
        assert not caplog.text
        state.load_state(tmp_path / "state.pt", model, None, optimiser, scheduler, "cpu", {}, "fp32", {})
    assert "saved by a run in bf16, resumed in fp32" in caplog.text


def test_a_state_saved_by_the_unfused_optimiser_resumes_fused(tmp_path):
    """state.pt of earlier versions holds "fused": None, which load_state_dict put over ours."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    unfused = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    unfused.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(unfused, lambda step: 1.0)
    state.save_state(tmp_path / "state.pt", model, None, unfused, scheduler, 1, 0.5, {}, "fp32", {})
    fused = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(fused, lambda step: 1.0)
    assert state.load_state(tmp_path / "state.pt", model, None, fused, scheduler, "cpu", {},
                            "fp32", {}) == (1, 0.5)
    assert fused.param_groups[0]["fused"] is True
    assert fused.state[model.weight]["step"].dtype == torch.float32
    fused.step()  # the fused kernel takes the loaded state


@pytest.mark.parametrize("change, message", [
    ({"classes": ["tissue", "sclerosis", "tuft"]},  # reordered: trained on silently, head swapped
     "class_names \\['tissue', 'tuft', 'sclerosis'\\] -> \\['tissue', 'sclerosis', 'tuft'\\]"),
    ({"classes": ["tissue", "tuft", "sclerosis", "fibrosis"]}, "class_names"),  # a traceback
])
def test_resuming_with_another_model_is_refused(dataset_root, tmp_path, change, message):
    config = config_dict(dataset_root, tmp_path)
    fit(config_from_dict(config, "test"), stop_at=2)
    config["model"] |= change
    with pytest.raises(CheckpointError, match=f"saved by a run of another model \\({message}"):
        fit(config_from_dict(config, "test"), resume=True)


def test_a_fresh_run_leaves_no_earlier_runs_state_or_checkpoints_and_a_resume_checks_its_config(
        dataset_root, tmp_path, capsys, caplog):
    """A second run into the same folder, killed before it saved, was resumed from the first
    run's state (nothing trained, exit 0), and the first run's checkpoints stood beside the
    second one's config until it validated."""
    first = config_dict(dataset_root, tmp_path, steps=4, validate_every=4)
    fit(config_from_dict(first, "test"))
    assert (tmp_path / "best.safetensors").exists()
    (tmp_path / ".state.tmp-999999999.pt").write_bytes(b"")  # a killed run's
    second = config_dict(dataset_root, tmp_path, steps=6, save_every=6)
    second["optim"]["lr"] = 1e-3
    fit(config_from_dict(second, "test"), stop_at=3)  # cut before it validated
    assert not any((tmp_path / name).exists() for name in (
        "best.safetensors", "last.safetensors", ".state.tmp-999999999.pt"))
    assert torch.load(tmp_path / "state.pt", weights_only=True)["config"]["optim"]["lr"] == 1e-3
    fit(config_from_dict(second, "test"), resume=True)
    capsys.readouterr()
    fit(config_from_dict(second, "test"), resume=True)
    assert "already at step 6 of 6; nothing to train" in capsys.readouterr().out
    with caplog.at_level("WARNING"):
        fit(config_from_dict(first, "test"), resume=True)
    assert "whose config differs in optim.lr, train.save_every, train.steps, " \
           "train.validate_every" in caplog.text


def test_a_damaged_state_or_one_without_the_average_asked_for_is_a_clear_error(dataset_root,
                                                                              tmp_path):
    config = config_dict(dataset_root, tmp_path)
    fit(config_from_dict(config, "test"), stop_at=2)
    config["train"]["ema_decay"] = 0.99  # KeyError: 'ema'
    with pytest.raises(CheckpointError, match="saved by a run without train.ema_decay"):
        fit(config_from_dict(config, "test"), resume=True)
    state = tmp_path / "state.pt"
    whole = state.read_bytes()
    for damaged in (whole[:5000], whole[:-5000]):  # OSError without a path, RuntimeError
        state.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="state.pt: cannot read the training state"):
            fit(config_from_dict(config, "test"), resume=True)


def test_a_loss_gone_nan_stops_the_run_before_a_model_is_saved(dataset_root, tmp_path):
    """NaN weights were saved as best.safetensors: predicting tissue everywhere scored well."""
    config = config_dict(dataset_root, tmp_path, steps=6, validate_every=3, log_every=100)
    config["optim"]["lr"] = 1e30
    with pytest.raises(ConfigError, match="the loss is nan at step 3; nothing was saved"):
        fit(config_from_dict(config, "test"))
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "state.pt").exists()


def test_log_csv_gives_each_step_the_learning_rate_it_ran_at(dataset_root, tmp_path):
    """Each row had the next step's (step 1 of a warm-up over 2: 0.003 for 0.0015)."""
    config = config_dict(dataset_root, tmp_path, steps=4)
    config["optim"] |= {"warmup_steps": 2, "schedule": "cosine"}
    fit(config_from_dict(config, "test"))
    with open(tmp_path / "log.csv", newline="") as f:
        rates = [float(row["lr"]) for row in csv.DictReader(f)]
    # warm-up (step + 1) / 2, then half a cosine over the 2 steps left (step 2 at its top)
    assert rates == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3 * 0.5 * (1 + np.cos(np.pi / 2))],
                                  abs=1e-12)


def test_a_split_with_nothing_to_train_on_is_refused_and_one_with_nothing_held_out_warned(
        dataset_root, tmp_path, caplog):
    config = config_dict(dataset_root, tmp_path / "all")
    config["data"]["split"] = {"validation_cases": ["case0", "case1", "case2"]}
    with pytest.raises(ConfigError, match="holds out every case for validation"):  # a traceback
        fit(config_from_dict(config, "test"))
    make_dataset(tmp_path / "one", cases=1)
    config = config_dict(tmp_path / "one", tmp_path / "out")
    config["data"]["split"] = {}
    with caplog.at_level("WARNING"):
        fit(config_from_dict(config, "test"))  # silently validated on nothing
    assert "no case held out for validation" in caplog.text
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_classes_the_scorer_does_not_know_are_warned_of(dataset_root, tmp_path, caplog):
    """A lab's own "glomerulus" class trained without a word, and gave no glomerulus metrics."""
    config = config_dict(dataset_root, tmp_path)
    config["model"]["classes"] = ["tissue", "glomerulus"]
    config["data"]["annotations"]["class_map"] = {"gn": "glomerulus", "gs": "glomerulus"}
    with caplog.at_level("WARNING"):
        fit(config_from_dict(config, "test"), stop_at=1)
    assert "model.classes ['glomerulus'] are not biopsy's classes" in caplog.text
    assert "model.classes has no glomerular class" in caplog.text


def test_validation_csv_holds_each_validated_step_once(dataset_root, tmp_path):
    """A run resumed from a state older than its last validation validates that step again; a
    fresh run into the same folder starts the file anew."""
    config = config_from_dict(config_dict(dataset_root, tmp_path, validate_every=2, save_every=1),
                              "test")

    def validated_steps() -> list[int]:
        with open(tmp_path / "validation.csv", newline="") as f:
            return [int(row["step"]) for row in csv.DictReader(f) if row["stain"] == "all"]

    fit(config, stop_at=3)
    older = (tmp_path / "state.pt").read_bytes()  # step 3
    fit(config, resume=True, stop_at=5)
    assert validated_steps() == [2, 4]
    (tmp_path / "state.pt").write_bytes(older)
    fit(config, resume=True)
    assert validated_steps() == [2, 4, 6]
    fit(config, stop_at=2)
    assert validated_steps() == [2]


def test_tensorboard_gets_the_log_rows_and_validation_metrics(dataset_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_from_dict(config_dict(dataset_root, tmp_path / "run", steps=4, validate_every=4,
                                          tensorboard=True), "test")
    metrics = fit(config)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in loss] == [1, 2, 3, 4]
    assert [value for _, value in loss] == pytest.approx(losses(tmp_path / "run"), rel=1e-6)
    dice = events.Scalars("validation/all/glomerulus_dice")
    assert [(e.step, e.value) for e in dice] == [(4, pytest.approx(metrics["all"]["glomerulus_dice"]))]


def test_ema_decay_ramps_up_so_the_starting_weights_fade():
    weights = [torch.tensor(float(value)) for value in [5.0, 1.0, 2.0, 3.0, 4.0]]
    model = torch.nn.Linear(1, 1, bias=False)
    averaged = ExponentialAverage(model, 0.5)
    expected = None
    for n, value in enumerate(weights):
        model.weight.data.fill_(value)
        averaged.update(model)
        decay = min(0.5, (1 + n) / (10 + n))  # n weights averaged so far
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert averaged.module.weight.item() == pytest.approx(float(expected))
    averaged = ExponentialAverage(model, 0.999)
    model.weight.data.fill_(1.0)
    averaged.update(model)
    model.weight.data.fill_(0.0)
    for _ in range(1000):
        averaged.update(model)
    assert averaged.module.weight.item() < 0.01  # a fixed 0.999 would keep 0.37 of the start


def test_ema_matches_torchs_averaged_model_and_its_state_dict():
    """Against torch's AveragedModel with the same ramp: parameters and BatchNorm buffers alike,
    and the same state-dict keys, so that training states saved with it still resume."""
    def ramp(averaged, current, updates):
        if not torch.is_floating_point(averaged[0]):
            return torch._foreach_copy_(averaged, current)
        n = int(updates)
        torch._foreach_lerp_(averaged, current, 1 - min(0.9, (1 + n) / (10 + n)))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours = ExponentialAverage(model, 0.9)
    theirs = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ramp, use_buffers=True)
    for _ in range(6):
        model(torch.randn(2, 3, 8, 8))  # BatchNorm statistics move
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        ours.update(model)
        theirs.update_parameters(model)
        mine, reference = ours.state_dict(), theirs.state_dict()
        assert list(mine) == list(reference)
        assert all(torch.equal(mine[name], reference[name]) for name in mine)
    resumed = ExponentialAverage(model, 0.9)  # from a state that AveragedModel saved
    resumed.load_state_dict(theirs.state_dict())
    model(torch.randn(2, 3, 8, 8))
    resumed.update(model)
    theirs.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(),
                                                 theirs.state_dict().values()))


def test_fine_tuning_starts_from_the_checkpoint_and_refuses_another_architecture(dataset_root, tmp_path):
    fit(config_from_dict(config_dict(dataset_root, tmp_path / "base", steps=2), "test"))
    base = tmp_path / "base" / "last.safetensors"
    data = config_dict(dataset_root, tmp_path / "tuned", steps=2)
    data["model"]["init_checkpoint"] = str(base)
    data["optim"]["lr"] = 0.0  # weights stay where they started
    fit(config_from_dict(data, "test"))
    start, _ = load_checkpoint(base)
    tuned, _ = load_checkpoint(tmp_path / "tuned" / "last.safetensors")
    convolutions = [k for k, v in start.state_dict().items() if v.ndim == 4]
    assert convolutions and all(torch.equal(start.state_dict()[k], tuned.state_dict()[k]) for k in convolutions)
    data["model"]["classes"] = ["tuft", "tissue", "sclerosis"]  # same shape, another head
    data["output_dir"] = str(tmp_path / "reordered")
    fit(config_from_dict(data, "test"))
    reordered, _ = load_checkpoint(tmp_path / "reordered" / "last.safetensors")
    body = [k for k in convolutions if not k.startswith("head.")]
    assert all(torch.equal(start.state_dict()[k], reordered.state_dict()[k]) for k in body)
    assert not torch.equal(start.state_dict()["head.weight"], reordered.state_dict()["head.weight"])
    data["model"]["arguments"] = {"encoder": "resnet34", "decoder_channels": [32, 16, 16, 8, 8]}
    with pytest.raises(CheckpointError, match="init_checkpoint"):
        fit(config_from_dict(data, "test"))


def test_two_process_ddp_on_cpu(dataset_root, tmp_path):
    data = config_dict(dataset_root, tmp_path / "ddp", steps=3, validate_every=3)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(data))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "training", "fit", str(path)],
        cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun's workers too
        raise
    assert process.returncode == 0, stderr[-3000:]
    assert len(losses(tmp_path / "ddp")) == 3
    _, info = load_checkpoint(tmp_path / "ddp" / "last.safetensors")
    assert info.validation_metrics["metrics"]["all"]["glomerulus_count"] == 4  # both ranks' shares


def test_cli_reports_user_errors_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\n")
    result = subprocess.run([sys.executable, "-m", "training", "fit", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(path) in result.stderr


def test_an_output_folder_that_cannot_be_made_is_a_one_line_error(dataset_root, tmp_path, capsys):
    afile = tmp_path / "a-file"
    afile.write_text("")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict(dataset_root, afile / "run")))
    assert training_main(["fit", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"training fit: error: {afile / 'run'}: Not a directory"


def test_bad_option_values_are_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        training_main(["synth", str(REPO / "configs/train/synthetic-pas.yaml"), "--slides", "0"])
    assert refused.value.code == 2
    assert "argument --slides: '0' is not a whole number >= 1" in capsys.readouterr().err


def test_synthetic_training_set_trains_end_to_end(tmp_path):
    from training.synthetic import generate_training_set

    data = yaml.safe_load((REPO / "configs" / "train" / "synthetic-pas.yaml").read_text())
    data["synth"].update(slides=2, stains=["pas", "he"],
                         profile={"core_length_mm": 0.5, "core_width_mm": 0.4, "glomeruli": 1})
    data["data"].update(root=str(tmp_path / "synth"), split={"validation_cases": ["synth-101-he"]})
    data["model"].update(patch_size_px=64, arguments=config_dict(tmp_path, tmp_path)["model"]["arguments"])
    data["train"].update(steps=2, batch_size=2, workers=0, validate_every=2)
    data["output_dir"] = str(tmp_path / "run")
    config = config_from_dict(data, "test")
    folders = generate_training_set(config)
    assert [f.name for f in folders] == ["synth-100-pas", "synth-101-he"]
    assert [yaml.safe_load((f / "profile.yaml").read_text())["stain"] for f in folders] == ["pas", "he"]
    slides = find_slides(config.data, config.model.classes, config.source)
    size = (slides[0].dimensions[0] // 8, slides[0].dimensions[1] // 8)  # whole slide at 4 µm/px
    image = slides[0].slide().read(0, 0, size, 4.0)
    labels = slides[0].labels.labels(0, 0, size, 4.0)
    assert image[labels == 0].mean() > 220 > image[(labels > 0) & (labels < 255)].mean()  # glass is white
    metrics = fit(config)
    assert metrics["all"]["glomerulus_count"] >= 1 and metrics["all"]["dice_background"] is not None
