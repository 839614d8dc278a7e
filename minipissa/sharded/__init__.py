"""PiSSA on sharded models (DTensor / FSDP2): DTensor helpers (:mod:`.dtensor`), moving a weight between its
shards and one rank (:mod:`.shards`), FSDP2 bookkeeping (:mod:`.fsdp`), and sharded init (:mod:`.init`).

Nothing is imported here, so that the files layer can use :mod:`.dtensor` without loading the rest.
"""
