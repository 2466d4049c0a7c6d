"""Data: the embedded watermark benchmark and the ImageNet path, behind one ``Split`` type."""

from cnp.data.splits import OOD_SUBGROUP, SUBGROUPS, PairData, Split, normalize_images
from cnp.data.watermark import WatermarkStyle

__all__ = ["OOD_SUBGROUP", "SUBGROUPS", "PairData", "Split", "WatermarkStyle", "normalize_images"]
