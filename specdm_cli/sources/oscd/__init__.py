"""OSCD reader: the three Onera folders (or their zips) in, bi-temporal uint16 patches out."""

from specdm_cli.sources.oscd.reader import read_oscd

__all__ = ["read_oscd"]
