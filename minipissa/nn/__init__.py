"""modules: the PiSSA layer, its ops, the shared casts, the frozen 4-bit layer."""
