"""Renal biopsy whole-slide image analysis.

Slide access at any µm/px, tissue detection, segmentation of glomerular lesions, NIH activity and
chronicity scoring, and paired pre/post comparison.
"""

__version__ = "0.1.0"
