"""What crosses from the producer to a worker: the frame protocol, the codecs, the schemas.

The producer side and the worker side of a feature meet here and nowhere else."""
