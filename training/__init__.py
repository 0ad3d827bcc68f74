"""Training pipeline of the segmentation model (imports ``biopsy``, never the reverse).

    python -m training synth CONFIG                        # synthetic training set, if CONFIG has one
    python -m training fit CONFIG [--resume] [--stop-at N]
    torchrun --nproc-per-node=N -m training fit CONFIG     # DDP; rank 0 logs and saves
    python -m training eval CONFIG --checkpoint CKPT [--data ROOT] [--json PATH]
    python -m training export CKPT OUT [--half]

Modules: ``config`` (typed YAML config), ``annotations`` (COCO / GeoJSON / label maps as labels),
``cases`` (annotated slides, split by case), ``dataset`` (patch sampler), ``augment``
(albumentations pipeline), ``losses`` (Dice + cross-entropy), ``loop`` (fit), ``state``
(state.pt, to resume), ``evaluate`` (per-class Dice, glomerulus detection F1), ``synthetic``
(the synthetic training set).
"""
