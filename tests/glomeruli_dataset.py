"""Tiny annotated glomeruli datasets and training configs for the training tests."""

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import disk

SIZE_PX = 160  # test images, 1 µm/px


def make_dataset(root: Path, cases: int = 3, seed: int = 0) -> None:
    """Images of pink discs (glomeruli; the second of each image sclerotic, dark) on pale tissue,
    two stains per case, and their COCO polygons."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    (root / "images").mkdir(parents=True)
    for case in range(cases):
        for stain in ("PAS", "PASM"):
            image = np.full((SIZE_PX, SIZE_PX, 3), (235, 220, 225), np.uint8)
            image_id = len(images)
            for k, (row, col) in enumerate([(45, 50), (110, 105)]):
                row, col, radius = row + rng.integers(-8, 9), col + rng.integers(-8, 9), rng.integers(22, 30)
                image[disk((row, col), radius, shape=image.shape[:2])] = (120, 40, 110) if k else (220, 120, 180)
                angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                polygon = np.column_stack([col + 0.5 + radius * np.cos(angles), row + 0.5 + radius * np.sin(angles)])
                annotations.append({"id": len(annotations), "image_id": image_id, "category_id": k,
                                    "segmentation": [polygon.ravel().round(1).tolist()]})
            image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
            name = f"case{case}-{stain}.png"
            Image.fromarray(image).save(root / "images" / name)
            images.append({"id": image_id, "file_name": f"images/{name}", "width": SIZE_PX, "height": SIZE_PX})
    images.append({"id": len(images), "file_name": "images/unannotated.png", "width": 4, "height": 4})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "unannotated.png")
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 0, "name": "gn"}, {"id": 1, "name": "gs"}]}
    (root / "coco.json").write_text(json.dumps(coco))


def config_dict(root: Path, output: Path, **train) -> dict:
    return {
        "seed": 1,
        "output_dir": str(output),
        "data": {"root": str(root), "slides": "images/*.png", "slide_mpp": 1.0,
                 "annotations": {"format": "coco", "path": "coco.json",
                                 "class_map": {"gn": "tuft", "gs": "sclerosis"}},
                 "unannotated": "tissue", "case_pattern": r"(case\d+)-", "stain_pattern": r"-(PASM|PAS)\.",
                 "split": {"validation_cases": ["case2"]}},
        "model": {"classes": ["tissue", "tuft", "sclerosis"],
                  "arguments": {"encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]},
                  "patch_size_px": 64},
        "augment": [{"transform": "D4"}, {"transform": "HEStain", "p": 0.5}],
        "optim": {"lr": 3e-3, "warmup_steps": 0},
        "train": {"steps": 6, "batch_size": 4, "workers": 0, "log_every": 1, "validate_every": 100,
                  "save_every": 100, **train},
        "evaluate": {"min_glomerulus_area_um2": 300},
    }
