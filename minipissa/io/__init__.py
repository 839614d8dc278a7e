"""files: safetensors and atomic writes, the adapter file, residual files, optimizer state."""
