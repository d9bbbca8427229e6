"""flora: FLoRA adapters (Tucker-structured weight updates) for PyTorch modules."""
