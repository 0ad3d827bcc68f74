"""The training loop: one process, or DDP under ``torchrun`` (gloo on CPU, NCCL on CUDA).

Rank 0 writes everything into ``output_dir``: ``config.yaml`` (resolved), ``log.csv`` (per logged
step: loss, learning rate, images/s and the seconds rank 0 spent blocked waiting for the data loader
since the previous row), ``validation.csv``, ``state.pt`` (resumable: :mod:`training.state`),
``last.safetensors`` and ``best.safetensors`` (inference checkpoints, see :mod:`biopsy.model`).
"""

import contextlib
import csv
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from biopsy.atomic import remove_temporaries, write_text_atomic
from biopsy.classes import CLASS_COLOURS, CLASS_NAMES, GLOMERULAR_CLASSES
from biopsy.errors import CheckpointError, ConfigError
from biopsy.heap import keep_freed_memory
from biopsy.infer import emulates_bf16
from biopsy.model import ModelInfo, build_model, load_checkpoint, save_checkpoint
from biopsy.slide import single_threaded_opencv
from training.augment import build_augmentation
from training.cases import find_slides, normalise_stains, split_by_case
from training.config import Config
from training.dataset import PatchDataset, default_object_classes
from training.ema import ExponentialAverage
from training.evaluate import check_best_metric, evaluate_slides
from training.losses import DiceCrossEntropyLoss
from training.state import load_state, model_identity, save_state

log = logging.getLogger(__name__)
RUN_FILES = ("state.pt", "last.safetensors", "best.safetensors")  # what a run leaves to resume or use


def fit(config: Config, resume: bool = False, stop_at: int | None = None) -> dict | None:
    """Train as ``config`` says; returns the last validation metrics (rank 0) or None.

    ``resume`` continues from ``output_dir/state.pt``; ``stop_at`` ends after that step (a run cut
    to fit a time slot, resumable later) without changing the schedule.
    """
    with _deterministic_algorithms(config.train.deterministic):
        return _train(config, resume, stop_at)


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    """While training, when ``enabled``: only deterministic CUDA kernels (cuDNN's too), so that a
    run and its resumed twin give the same numbers on a GPU; the previous setting afterwards
    (``CUBLAS_WORKSPACE_CONFIG``, which cuBLAS reads once, stays set)."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _train(config: Config, resume: bool, stop_at: int | None) -> dict | None:
    rank, world, device = _init_distributed()
    if device.type == "cpu":
        keep_freed_memory()  # float32 steps ~20 % faster on a 2-core CPU (biopsy/heap.py)
    if config.train.tensorboard:
        _summary_writer_class()  # on every rank, so that none waits for one that stopped
    output = Path(config.output_dir)
    bf16 = _bf16(config, device, rank)
    precision = "bf16" if bf16 else "fp32"
    torch.manual_seed(config.seed)
    training_slides, validation_slides, info = _slides_and_info(config, rank)
    model = _model(config, info, device, initialise=not resume, rank=rank)
    ema = ExponentialAverage(model, config.train.ema_decay) if config.train.ema_decay else None
    optimiser = build_optimiser(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(config))
    start, best = 0, -math.inf
    if resume:
        start, best = load_state(output / "state.pt", model, ema, optimiser, scheduler, device,
                                  model_identity(info), precision, config.to_dict())
    network = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    if config.train.compile:
        network = torch.compile(network)
    last_step = min(config.train.steps, stop_at or config.train.steps)
    if start >= last_step:
        if rank == 0:
            print(f"{output / 'state.pt'}: already at step {start} of {config.train.steps}; "
                  "nothing to train")
        return None
    loader = _loader(config, training_slides, rank, device, start, last_step)
    loss_function = _loss_function(config, info, device)
    csv_log, board = _start_logs(config, output, start) if rank == 0 else (None, None)
    progress = tqdm(total=config.train.steps, initial=start, disable=rank != 0, desc="fit", unit="step",
                    mininterval=1.0)  # each redraw took ~7 ms of the main thread on the H200 run
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    batches = iter(loader)
    metrics, timer, logged_step, data_wait_s, paused_s = None, time.perf_counter(), start, 0.0, 0.0
    for step in range(start + 1, last_step + 1):
        waiting = time.perf_counter()
        images, labels = next(batches)
        data_wait_s += time.perf_counter() - waiting
        inputs = info.normalise(images.to(device, non_blocking=True))
        target = labels.to(device, non_blocking=True).long()
        with autocast:
            loss = loss_function(network(inputs), target)
        lr = scheduler.get_last_lr()[0]  # this step's: the update moves the scheduler on
        _update(loss, model, optimiser, scheduler, ema, config.optim.grad_clip_norm)
        progress.update()
        logs = step % config.train.log_every == 0 or step == last_step
        validates = step % config.train.validate_every == 0 or step == config.train.steps
        saves = step % config.train.save_every == 0 or step == last_step
        if logs or validates or saves:  # never a model saved from a loss gone NaN
            mean_loss = _finite_mean_loss(loss.detach(), world, step, config.source)
        if logs:
            if csv_log is not None:
                images_per_s = config.train.batch_size * world * (step - logged_step) / (
                    time.perf_counter() - timer - paused_s)  # validating and saving left out
                for log_ in filter(None, (csv_log, board)):
                    log_.write(step, mean_loss, lr, images_per_s, data_wait_s)
            logged_step, data_wait_s, paused_s, timer = step, 0.0, 0.0, time.perf_counter()
            progress.set_postfix(loss=f"{mean_loss:.4f}")
        pausing = time.perf_counter()
        if validates:
            evaluated = ema.module if ema is not None else model
            metrics = evaluate_slides(evaluated, info, validation_slides, config.evaluate, device,
                                      config.train.batch_size, bf16)
            if rank == 0:
                best = _save_checkpoints(output, evaluated, info, metrics, step, config, best,
                                         validation_slides)
                if board is not None:
                    board.validation(step, metrics)
        if saves and rank == 0:
            save_state(output / "state.pt", model, ema, optimiser, scheduler, step, best,
                        model_identity(info), precision, config.to_dict())
        paused_s += time.perf_counter() - pausing
    progress.close()
    if board is not None:
        board.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics if rank == 0 else None


def _bf16(config: Config, device: torch.device, rank: int) -> bool:
    """Whether the steps run in bfloat16 (``train.precision``), with a warning where that is
    emulated."""
    bf16 = config.train.bf16(device.type)
    if bf16 and emulates_bf16(device) and rank == 0:
        log.warning("%s: train.precision bf16 on this CPU, which has no bfloat16 instructions: "
                    "~10x slower than float32 (precision: auto picks what is fast)", config.source)
    return bf16


def _loss_function(config: Config, info: ModelInfo, device: torch.device) -> DiceCrossEntropyLoss:
    weights = (torch.tensor([config.loss.class_weights.get(c, 1.0) for c in info.class_names],
                            device=device) if config.loss.class_weights else None)
    return DiceCrossEntropyLoss(config.loss.dice_weight, config.loss.ce_weight, weights).to(device)


def _slides_and_info(config: Config, rank: int) -> tuple[list, list, ModelInfo]:
    """(training slides, validation slides, the checkpoint metadata), the config checked against
    the data: a case to train on, the best metric, one kind of slide, the stain reference."""
    slides = find_slides(config.data, config.model.classes, config.source)
    training_slides, validation_slides = split_by_case(slides, config.data.split, config.source)
    if not training_slides:
        raise ConfigError(f"{config.source}: data.split holds out every case for validation; "
                          "leave at least one to train on")
    if rank == 0:
        _warn_of_unknown_classes(config)
        if not validation_slides:
            log.warning("%s: no case held out for validation (one case?): no validation metrics "
                        "and no best.safetensors, only last.safetensors", config.source)
    check_best_metric(config.train.best_metric, config.model.classes, {s.stain for s in slides},
                      {s.stain for s in validation_slides}, config.source)
    info = model_info(config, _fluorescence(training_slides + validation_slides, config.source))
    if config.model.stain_normalisation:
        info.stain_reference = normalise_stains(training_slides, validation_slides)
    return training_slides, validation_slides, info


def _model(config: Config, info: ModelInfo, device: torch.device, initialise: bool,
           rank: int) -> torch.nn.Module:
    """The model on ``device`` in channels_last memory (as the inputs), from
    ``model.init_checkpoint`` when ``initialise`` (a fresh run) and the config gives one."""
    model = build_model(info.architecture, len(info.class_names), info.in_channels,
                        encoder_weights=config.model.encoder_weights, **info.arguments)
    if config.model.init_checkpoint and initialise:
        message = _load_initial_weights(model, info, Path(config.model.init_checkpoint))
        if rank == 0:
            print(message)
    return model.to(device, memory_format=torch.channels_last)


def _update(loss: torch.Tensor, model, optimiser, scheduler, ema, grad_clip_norm: float) -> None:
    """One optimisation step from ``loss``: gradients (clipped), weights, learning rate, average."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimiser.step()
    scheduler.step()
    if ema is not None:
        ema.update(model)


def _start_logs(config: Config, output: Path, start: int):
    """Rank 0's output folder: config.yaml written, log.csv and validation.csv as they were at
    ``start`` (a fresh run's, at 0, removes an earlier run's state and checkpoints, so that none
    stands beside its config); the CSV log and the TensorBoard one (None unless asked for)."""
    output.mkdir(parents=True, exist_ok=True)
    remove_temporaries(output, RUN_FILES)  # a killed run's
    for name in RUN_FILES if start == 0 else ():
        (output / name).unlink(missing_ok=True)
    write_text_atomic(output / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    csv_log = _CsvLog(output / "log.csv", start)
    _drop_validation_rows_after(output / "validation.csv", start)
    return csv_log, (_TensorBoardLog(output, start) if config.train.tensorboard else None)


def _warn_of_unknown_classes(config: Config) -> None:
    """Classes the scorer does not know are segmented but never scored; without a glomerular
    class there are no glomerulus metrics (and no best checkpoint by one)."""
    unknown = [name for name in config.model.classes if name not in CLASS_NAMES]
    if unknown:
        log.warning("%s: model.classes %s are not biopsy's classes (%s): segmented, never scored; "
                    "map annotation classes to them with data.annotations.class_map",
                    config.source, unknown, ", ".join(CLASS_NAMES))
    if not set(config.model.classes) & set(GLOMERULAR_CLASSES):
        log.warning("%s: model.classes has no glomerular class (%s): no glomerulus metrics",
                    config.source, ", ".join(sorted(GLOMERULAR_CLASSES)))


def _fluorescence(slides, source: str) -> bool:
    """Whether the slides are fluorescence; refused when they mix it with brightfield."""
    kinds = {s.fluorescence for s in slides}
    if len(kinds) > 1:
        raise ConfigError(f"{source}: the slides mix brightfield and fluorescence; train a model "
                          "on one kind")
    return kinds.pop()


def model_info(config: Config, fluorescence: bool = False) -> ModelInfo:
    """The checkpoint metadata a model trained with ``config`` (on fluorescence slides or not)
    carries before validation."""
    model = config.model
    colours = {name: list(model.class_colours.get(name, CLASS_COLOURS.get(name, (128, 128, 128))))
               for name in model.classes}
    return ModelInfo(architecture=model.architecture, arguments=dict(model.arguments),
                     class_names=list(model.classes), class_colours=colours,
                     input_mpp=model.input_mpp, patch_size_px=model.patch_size_px,
                     in_channels=model.in_channels, fluorescence=fluorescence,
                     glomerulus_threshold=model.glomerulus_threshold,
                     normalisation={"mean": list(model.normalisation_mean),
                                    "std": list(model.normalisation_std)},
                     training_config=config.to_dict())


def _load_initial_weights(model: torch.nn.Module, info: ModelInfo, path: Path) -> str:
    """Start from the weights of checkpoint ``path`` (fine-tuning); says how many were taken. It
    must have the same architecture and arguments; a head for other classes (or the same classes
    in another order) or a stem for other channels keeps its fresh initialisation."""
    start, start_info = load_checkpoint(path)
    if (start_info.architecture, start_info.arguments) != (info.architecture, info.arguments):
        raise CheckpointError(f"{path}: model.init_checkpoint is a {start_info.architecture} "
                              f"{start_info.arguments}, the config asks for {info.architecture} "
                              f"{info.arguments}; fine-tuning needs the same architecture")
    own = model.state_dict()
    fitting = {k: v.to(own[k].dtype) for k, v in start.state_dict().items() if v.shape == own[k].shape}
    if start_info.class_names != info.class_names:  # another head, even of the same shape
        fitting = {k: v for k, v in fitting.items() if not k.startswith("head.")}
    model.load_state_dict(fitting, strict=False)
    return f"fine-tuning from {path}: {len(fitting)} of {len(own)} tensors taken over"


def _init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def build_optimiser(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The config's optimiser, fused: a few kernels a step for all the parameters. torch's
    default (foreach on CUDA: several kernels per group of tensors) took ~5 ms of the main
    thread a step at batch 64 on an H200 (a cProfile of benchmarks/train.py), in which the
    GPU is fed nothing when the loop is not ahead of it."""
    optim = config.optim
    if optim.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay, nesterov=True, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                             fused=True)


def _schedule(config: Config):
    """Learning-rate factor per step: linear warm-up, then poly (power 0.9) or cosine decay."""
    steps, warmup, kind = config.train.steps, config.optim.warmup_steps, config.optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return (1 - progress) ** 0.9 if kind == "poly" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def patch_dataset(config: Config, slides, rank: int) -> PatchDataset:
    """This rank's stream of training patches: the config's sampling and augmentation."""
    return PatchDataset(
        slides, config.model, config.sampling,
        config.sampling.object_classes or default_object_classes(config.model.classes, config.data.unannotated),
        build_augmentation(config.augment, config.source), config.seed, rank,
        config.train.steps * config.train.batch_size)


def _loader(config: Config, slides, rank: int, device: torch.device, start: int, stop: int):
    """Batches ``start + 1 .. stop`` of this rank's patch stream."""
    batch = config.train.batch_size
    dataset = patch_dataset(config, slides, rank)
    workers = config.train.workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=range(start * batch, stop * batch), num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers else None, worker_init_fn=single_threaded_opencv)


def _finite_mean_loss(loss: torch.Tensor, world: int, step: int, source: str) -> float:
    """The loss averaged over the ranks; a :class:`ConfigError` where it is not finite (the
    config's settings made the run diverge)."""
    if world > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    value = float(loss)
    if not math.isfinite(value):
        raise ConfigError(f"{source}: the loss is {value} at step {step}; nothing was saved "
                          "from this step on. Lower optim.lr, or check the config's "
                          "model.normalisation_std and loss.class_weights")
    return value


def _save_checkpoints(output: Path, model, info: ModelInfo, metrics: dict, step: int, config: Config,
                      best: float, validation_slides) -> float:
    """Write last.safetensors (and best.safetensors when the best metric improved), validation.csv."""
    stain, name = config.train.best_metric.split("/", 1)
    value = metrics.get(stain, {}).get(name)
    info.validation_metrics = {"step": step, "metrics": metrics, "best_metric": config.train.best_metric,
                               "validation_cases": sorted({s.case for s in validation_slides})}
    save_checkpoint(output / "last.safetensors", model, info)
    if value is not None and value > best:
        best = value
        save_checkpoint(output / "best.safetensors", model, info)
    path = output / "validation.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        names = list(metrics["all"])
        if new:
            writer.writerow(["step", "stain", *names])
        for group, values in metrics.items():
            writer.writerow([step, group, *("" if values[n] is None else
                                            f"{values[n]:.4f}" if isinstance(values[n], float) else values[n]
                                            for n in names)])
    return best


def _drop_validation_rows_after(path: Path, step: int) -> None:
    """validation.csv as it was at ``step``: a resumed run validates the later steps again, and a
    fresh run (step 0) starts the file anew."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *(r for r in rows if int(r[0]) <= step)])


class _CsvLog:
    """log.csv: step, loss, lr, images/s, data wait (s); on resume rows after the resumed step are
    dropped (rows of an older log without a column get it empty)."""

    HEADER = ["step", "loss", "lr", "images_per_s", "data_wait_s"]

    def __init__(self, path: Path, start: int):
        rows = []
        if start and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r + [""] * (len(self.HEADER) - len(r)) for r in rows if int(r[0]) <= start]
        self.path = path
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([self.HEADER, *rows])

    def write(self, step: int, loss: float, lr: float, images_per_s: float, data_wait_s: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([step, repr(loss), f"{lr:.6g}", f"{images_per_s:.6g}",
                                    f"{data_wait_s:.4f}"])


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError("train.tensorboard needs TensorBoard: pip install 'renal-biopsy[tensorboard]'"
                          ) from error
    return SummaryWriter


class _TensorBoardLog:
    """log.csv's columns and the validation metrics as TensorBoard scalars in ``output_dir/tensorboard``
    (``train.tensorboard: true``; events of an earlier run after the starting step are dropped)."""

    def __init__(self, output: Path, start: int):
        self.writer = _summary_writer_class()(output / "tensorboard", purge_step=start + 1)

    def write(self, step: int, loss: float, lr: float, images_per_s: float, data_wait_s: float) -> None:
        for name, value in zip(_CsvLog.HEADER[1:], (loss, lr, images_per_s, data_wait_s)):
            self.writer.add_scalar(f"train/{name}", value, step)

    def validation(self, step: int, metrics: dict[str, dict]) -> None:
        for group, values in metrics.items():
            for name, value in values.items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"validation/{group}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
