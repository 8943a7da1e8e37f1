"""Using converted models: the catalogue of official checkpoints, download, get_model, inference, evaluation."""
