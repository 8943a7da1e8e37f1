"""Proof of parity: `verify` (TensorFlow vs PyTorch), its reports, and synthetic official checkpoints."""
