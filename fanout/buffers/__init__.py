"""Where big buffers wait outside the rings: the shared-memory arena and the Ray object store."""
