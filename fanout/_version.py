"""The version of fanout, in one place: packaging metadata and ``fanout.__version__`` read it."""

__version__ = "0.1.0"
