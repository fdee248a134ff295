"""The built-in `demo` source: synthetic Sentinel-2-like land-cover scenes, no download needed.

A scene is painted as regions (field parcels, forest stands, a town, water, roads; `scenes`);
each region is a linear mixture of endmember spectra (`spectra`). The image is that mixture
rendered at the band set (the 10 SpecDM Sentinel-2 bands, or a 211-band 400-2500 nm grid) with
texture, a soft sensor PSF, an acquisition gain/haze and sensor noise, as L2A-like reflectance
x 10000 (uint16; `render`). A change pair's second date is the scene evolved (`change`). Pixels
are 10 m. Sample i depends only on (seed, i); `reader` plans `prepare demo`.
"""

from specdm_cli.sources.demo.reader import read_demo

__all__ = ["read_demo"]
