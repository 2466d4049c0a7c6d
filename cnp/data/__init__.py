"""Data: the embedded watermark benchmark and the real-data path (ImageNet or any image folder),
behind one ``Split`` type; :func:`export_pair` writes a pair to disk as an image folder."""

from cnp.data.folder import export_pair, export_synthetic, make_manifest
from cnp.data.splits import OOD_SUBGROUP, SUBGROUPS, PairData, Split
from cnp.data.watermark import WatermarkStyle
from cnp.images import normalize_images

__all__ = ["OOD_SUBGROUP", "SUBGROUPS", "PairData", "Split", "WatermarkStyle", "export_pair", "export_synthetic",
           "make_manifest", "normalize_images"]
