"""The resumable training state, ``state.pt``: model, EMA, optimiser, scheduler, step, best
metric, RNG, and what a resumed run must share with the run that saved it (the model's form,
the precision, the config)."""

import logging
import pickle
from pathlib import Path

import torch

from biopsy.atomic import atomic_path
from biopsy.errors import CheckpointError
from biopsy.model import ModelInfo

log = logging.getLogger(__name__)


def changed_settings(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted names of the settings in which two configs (``Config.to_dict``) differ."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


def model_identity(info: ModelInfo) -> dict:
    """What a resumed run must share with the run that saved its state: the model's form and
    the meaning of its outputs."""
    return {"architecture": info.architecture, "arguments": info.arguments,
            "class_names": list(info.class_names), "in_channels": info.in_channels}


def save_state(path: Path, model, ema, optimiser, scheduler, step: int, best: float,
               identity: dict, precision: str, config: dict) -> None:
    state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "best": best,
             "rng_cpu": torch.get_rng_state(), "identity": identity, "precision": precision,
             "config": config}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_state(path: Path, model, ema, optimiser, scheduler, device, identity: dict,
               precision: str, config: dict) -> tuple[int, float]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from; run without --resume")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: cannot read the training state ({error}): damaged, or "
                              "not one; train anew without --resume") from None
    if state.get("precision", precision) != precision:  # precision auto on another machine
        log.warning("%s: saved by a run in %s, resumed in %s: the loss curve will not continue "
                    "exactly", path, state["precision"], precision)
    changed = changed_settings(state.get("config", config), config)  # older states lack it
    if changed:
        log.warning("%s: saved by a run whose config differs in %s: the loss curve will not "
                    "continue as that run's would", path, ", ".join(changed))
    if ema is not None and "ema" not in state:
        raise CheckpointError(f"{path}: saved by a run without train.ema_decay; resume without "
                              "it, or train anew without --resume")
    saved = state.get("identity", identity)  # older states did not record it
    changed = [key for key in identity if saved.get(key) != identity[key]]
    try:
        if changed:
            raise ValueError(", ".join(f"{key} {saved.get(key)} -> {identity[key]}" for key in changed))
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: saved by a run of another model ({error}); resume with the "
                              "config that made it, or train into another output_dir") from None
    for group in state["optimiser"]["param_groups"]:  # a state saved unfused: its steps moved
        group["fused"] = True                            # to the device, as fused ones take them
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    return int(state["step"]), float(state["best"])
