"""gan-dist: distributed multi-GPU GAN training on accelerate, webdataset and W&B."""

__version__ = "0.1.0"
