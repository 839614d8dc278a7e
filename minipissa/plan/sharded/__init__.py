"""FSDP2: gather, factor and scatter sharded weights, feeding the same factor stream."""
