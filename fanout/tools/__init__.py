"""The ``fanout`` command: ``fanout bench``, ``fanout top``, and the metrics endpoint."""
