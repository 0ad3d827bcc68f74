"""Glomerulus counts and global-sclerosis calls through the scorer, on real photomicrographs.

Each validation image of ``configs/train/real-glomeruli.yaml`` (cases never trained on; COCO
outlines of every glomerulus, ``gs`` = globally sclerotic) goes through the production path:
:func:`biopsy.infer.segment_slide` (Gaussian-blended tiles) and
:func:`biopsy.scorefolder.score_class_map` (watershed-split instances, lesion calls from
``configs/score/nih-2018.yaml``). Predicted glomeruli are matched one-to-one to the outlines by
IoU >= 0.5 (each outline its own glomerulus, touching or not; outlines under
``evaluate.min_glomerulus_area_um2`` left out, as ``training eval`` does: one degenerate 4 µm²
polygon); the table gives, per stain and over all, detection
precision / recall / F1, the global-sclerosis F1 (a hit is a matched pair where both are
globally sclerotic) and the mean absolute error of the glomerulus count per image. Mirror images,
reading scales and the pixel-size search are the config's ``evaluate`` ones unless given.

    python -m training fit configs/train/real-glomeruli.yaml         # a GPU: ~10 min
    python benchmarks/real_glomeruli.py --checkpoint runs/real-glomeruli/best.safetensors
    python benchmarks/real_glomeruli.py --folds 4    # every case, by its fold's model (fit --folds 4)
    python benchmarks/real_glomeruli.py --folds 4 --tta --scales 1 1.41   # test-time augmentation
    python benchmarks/real_glomeruli.py --folds 4 --glomerulus-threshold 0.7   # decision sweep
    python benchmarks/real_glomeruli.py --folds 4 --mpp-search 1   # each image at its given size

The data's licence is unstated: the weights trained on it stay out of the repository.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biopsy.cli.batch import add_test_time_arguments  # noqa: E402
from biopsy.infer import segment_slide  # noqa: E402
from biopsy.model import load_checkpoint, with_glomerulus_threshold  # noqa: E402
from biopsy.scorefolder import score_class_map  # noqa: E402
from biopsy.scoring import load_score_config  # noqa: E402
from training.cases import find_slides  # noqa: E402
from training.config import load_config  # noqa: E402
from training.__main__ import (add_glomerulus_threshold_argument,  # noqa: E402
                               with_test_time_options)
from biopsy.classes import glomerular_indices  # noqa: E402
from training.evaluate import (at_searched_mpp, fold_model, kept_instances,  # noqa: E402
                               match_instances, validation_slides)


def image_counts(annotated, model, info, score_config, device: str, settings) -> np.ndarray:
    """[TP, FP, FN, GS TP, GS FP, GS FN, |count error|] of one annotated image, segmented with
    the mirror images, reading scales and pixel-size search of ``settings`` (a training config's
    ``evaluate``); outlines smaller than ``settings.min_glomerulus_area_um2`` are left out, as
    ``training eval`` leaves them."""
    bf16 = torch.device(device).type == "cuda"  # as segment_slide decides
    annotated, _ = at_searched_mpp(annotated, model, info, settings, device, bf16=bf16)
    slide = annotated.slide()
    class_map = segment_slide(slide, model, info, device=device, workers=0, tta=settings.tta,
                              scales=tuple(settings.scales))
    scored = score_class_map(class_map.labels, class_map.class_names, class_map.mpp, score_config,
                             level0_mpp=slide.mpp[0])
    height, width = class_map.labels.shape
    truth = annotated.labels.labels(0, 0, (width, height), class_map.mpp)
    min_area_px = settings.min_glomerulus_area_um2 / class_map.mpp**2
    truth_instances = kept_instances(annotated.labels.instances(
        0, 0, (width, height), class_map.mpp, glomerular_indices(info.class_names)), min_area_px)
    sclerosis = info.class_names.index("sclerosis")
    truth_sclerotic = {i for i in range(1, truth_instances.max() + 1)
                       if (truth[truth_instances == i] == sclerosis).mean() >= 0.5}
    predicted_sclerotic = {g.glomerulus_id for g in scored.glomeruli if "global_sclerosis" in g.lesions}
    matches = match_instances(truth_instances, scored.instances, settings.iou_threshold)
    hits = len(matches)
    sclerotic_hits = sum(1 for t, p in matches if t in truth_sclerotic and p in predicted_sclerotic)
    n_truth, n_predicted = int(truth_instances.max()), len(scored.glomeruli)
    return np.array([hits, n_predicted - hits, n_truth - hits,
                     sclerotic_hits, len(predicted_sclerotic) - sclerotic_hits,
                     len(truth_sclerotic) - sclerotic_hits, abs(n_predicted - n_truth)])


def f1(tp: int, fp: int, fn: int) -> float | None:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def print_table(counts: dict[str, np.ndarray], images: dict[str, int]) -> None:
    print("| stain | images | glomeruli | precision | recall | detection F1 | global sclerosis (truth) "
          "| GS F1 | count error / image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stain in sorted(counts, key=lambda s: (s == "all", s)):
        tp, fp, fn, gtp, gfp, gfn, count_error = counts[stain]
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        gs = f1(gtp, gfp, gfn)
        print(f"| {stain} | {images[stain]} | {tp + fn} | {precision:.3f} | {recall:.3f} | "
              f"{f1(tp, fp, fn) or 0:.3f} | {gtp + gfn} | {'n/a' if gs is None else f'{gs:.3f}'} | "
              f"{count_error / images[stain]:.2f} |")


def models_and_slides(args, config):
    """(model, info, validation slides): the checkpoint's on the cases it was validated on (as
    ``training eval``), or each fold's on the cases it held out."""
    if args.folds is None:
        model, info = load_checkpoint(args.checkpoint, args.device)
        info = with_glomerulus_threshold(info, args.glomerulus_threshold, args.checkpoint)
        slides = find_slides(config.data, info.class_names, config.source)
        yield model, info, validation_slides(slides, config, info, args.checkpoint)
    else:
        for fold in range(args.folds):
            yield fold_model(config, fold, args.folds, args.device, args.glomerulus_threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a model with tuft and sclerosis classes")
    source.add_argument("--folds", type=int, metavar="N",
                        help="cross-validation: each fold's OUTPUT_DIR/fold-K/last.safetensors on "
                             "the cases it held out (python -m training fit CONFIG --folds N)")
    parser.add_argument("--config", default=str(REPO / "configs/train/real-glomeruli.yaml"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_test_time_arguments(parser, config_key="the config's evaluate")
    add_glomerulus_threshold_argument(parser, "instead of the checkpoints'")
    args = parser.parse_args()
    if args.folds is not None and args.folds < 2:
        parser.error("--folds needs at least 2")
    config = with_test_time_options(load_config(args.config), args.tta, args.scales,
                                    args.mpp_search)
    settings = config.evaluate
    score_config = load_score_config()
    counts, images, cases = defaultdict(lambda: np.zeros(7, int)), defaultdict(int), set()
    for model, info, slides in models_and_slides(args, config):
        cases |= {s.case for s in slides}
        for annotated in slides:
            result = image_counts(annotated, model, info, score_config, args.device, settings)
            for key in (annotated.stain, "all"):
                counts[key] += result
                images[key] += 1
    print(f"{args.checkpoint or f'{args.folds}-fold cross-validation'}: {images['all']} validation "
          f"images of {len(cases)} cases, {info.input_mpp} µm/px, scoring config nih-2018"
          f"{', mirror images' if settings.tta else ''}, reading scales {settings.scales}, "
          f"{f'pixel size searched x {settings.mpp_search}, ' if settings.mpp_search else ''}"
          f"glomerulus threshold {info.glomerulus_threshold or 'none (argmax)'}\n")
    print_table(counts, images)


if __name__ == "__main__":
    main()
