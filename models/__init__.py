"""Nets behind one interface; importing this package registers every net."""
from . import mobile_sam, sam
from .registry import build_segmenter
