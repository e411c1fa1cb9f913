"""The native kernels (rings, pump, worker loop) beside their pure-Python twins.

``pick`` chooses between them once, at import."""
