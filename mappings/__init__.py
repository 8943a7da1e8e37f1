"""Name-mapping tables from source checkpoints to PyTorch state dicts."""
