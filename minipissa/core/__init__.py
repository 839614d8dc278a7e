"""tensors in, tensors out: linear algebra, decompositions, NF4, fingerprints, weight layout, errors."""
