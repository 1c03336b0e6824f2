"""Plain PyTorch models, losses, data transforms and attacks. Never imports Ray."""
