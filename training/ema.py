"""An exponential moving average of a model's weights, for validation and the saved checkpoints."""

import copy

import torch
from torch import nn


class ExponentialAverage(nn.Module):
    """``module`` holds the average of the parameters and floating buffers (BatchNorm statistics)
    of the model given to :meth:`update`; integer buffers (BatchNorm's batch counts) are copied.

    The decay ramps as (1 + n) / (10 + n) up to ``decay`` after n updates: a fixed 0.999 keeps
    0.999^n of the starting weights, 37 % after 1000 steps, which made a 1000-step real-glomeruli
    run validate at glomerulus Dice 0.65 where its raw weights had 0.90. The update count stays on
    the CPU, so that an update never waits for the GPU (torch's ``AveragedModel`` copies it to
    the device and back each time); the state dict has ``AveragedModel``'s keys.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (the first update copies them)."""
        n = int(self.n_averaged)
        pairs = list(zip(_weights(self.module), _weights(model), strict=True))
        floating = [(a, c) for a, c in pairs if a.is_floating_point()] if n else []
        copied = [(a, c) for a, c in pairs if not (n and a.is_floating_point())]
        if floating:
            averaged, current = zip(*floating)
            torch._foreach_lerp_(averaged, current, 1 - min(self.decay, (1 + n) / (10 + n)))
        if copied:
            averaged, current = zip(*copied)
            torch._foreach_copy_(averaged, current)
        self.n_averaged += 1


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]
