"""Nets behind one interface; importing this package registers every net."""
from . import efficient_sam, lite_medsam, mobile_sam, sam
from .registry import build_segmenter

__all__ = ["build_segmenter", "efficient_sam", "lite_medsam", "mobile_sam", "sam"]
