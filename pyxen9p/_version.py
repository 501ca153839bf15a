"""The version of pyxen9p."""

__version__ = "0.1.0"
