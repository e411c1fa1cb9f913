"""The version of fanout, in one place: packaging metadata and ``fanout.__version__`` read it."""

__version__ = "0.1.0"

# The name fanout is installed under: PyPI's "fanout" is an unrelated project, so
# extras are installed as pip install 'fanout-informer[extra]'; the import name
# stays fanout.
DISTRIBUTION = "fanout-informer"
