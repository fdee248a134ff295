"""specdm: synthetic labelled multispectral datasets with SpecDM."""

__version__ = "0.1.0"
