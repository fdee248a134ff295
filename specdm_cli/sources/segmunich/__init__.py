"""SegMunich (SpectralGPT's TUM_128, GFM-Bench, DOFA's mmseg copy): `layout` finds the tree and
its patches, `pixels` reads their files, `reader` plans `prepare segmunich`."""

from specdm_cli.sources.segmunich.layout import MMSEG_CLASSES, SEGMUNICH_BANDS, SEGMUNICH_CLASSES
from specdm_cli.sources.segmunich.reader import read_segmunich

__all__ = ["MMSEG_CLASSES", "SEGMUNICH_BANDS", "SEGMUNICH_CLASSES", "read_segmunich"]
