"""The U-Net's sub-pixel decoder (``biopsy/subpixel.py``) against the BatchNorm-folded model as
it is (torch.fx), the model alone on random tiles: ms a tile, float32 and bf16, and the share of
pixels whose class agrees.

On CPU ``biopsy segment`` runs the sub-pixel form; on CUDA the folded model, until this says the
sub-pixel form is faster there too.

    python benchmarks/subpixel.py                                  # CPU, batch 8
    python benchmarks/subpixel.py --device cuda --batch-size 64    # GPU machine
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from biopsy.heap import keep_freed_memory  # noqa: E402
from biopsy.model import DEFAULT_CHECKPOINT, load_checkpoint  # noqa: E402
from biopsy.subpixel import inference_unet  # noqa: E402


def ms_per_tile(model, tiles: torch.Tensor, autocast, repeats: int) -> float:
    """Median ms a tile over ``repeats`` timed batches, after two untimed."""
    times = []
    with torch.inference_mode(), autocast:
        for index in range(repeats + 2):
            started = time.perf_counter()
            model(tiles)
            if tiles.is_cuda:
                torch.cuda.synchronize()
            if index >= 2:
                times.append(time.perf_counter() - started)
    return statistics.median(times) / len(tiles) * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8, help="timed batches per form (default 8)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as biopsy.infer.prepare_model does
    model, info = load_checkpoint(DEFAULT_CHECKPOINT)
    forms = {"folded (fx)": fuse(copy.deepcopy(model).eval()), "sub-pixel": inference_unet(model)}
    forms = {name: form.to(device, memory_format=torch.channels_last) for name, form in forms.items()}
    torch.manual_seed(0)
    tiles = torch.rand(args.batch_size, info.in_channels, info.patch_size_px, info.patch_size_px,
                       device=device).contiguous(memory_format=torch.channels_last)
    print(f"the bundled model alone, {device}, batch {args.batch_size}, "
          f"{info.patch_size_px} px tiles: ms a tile")
    for precision in ("float32", "bf16"):
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else nullcontext())
        with torch.inference_mode(), autocast:
            classes = {name: form(tiles).argmax(1) for name, form in forms.items()}
        agreement = (classes["folded (fx)"] == classes["sub-pixel"]).float().mean().item()
        # each form twice, in turn, so that a drift in the machine's speed shows
        times = {name: [] for name in forms}
        for _ in range(2):
            for name, form in forms.items():
                times[name].append(ms_per_tile(form, tiles, autocast, args.repeats))
        folded, subpixel = (times[name] for name in forms)
        print(f"  {precision:8} folded {min(folded):.2f}-{max(folded):.2f}, sub-pixel "
              f"{min(subpixel):.2f}-{max(subpixel):.2f} "
              f"({statistics.mean(folded) / statistics.mean(subpixel):.2f}x); "
              f"classes agree on {agreement:.6f} of pixels")


if __name__ == "__main__":
    main()
