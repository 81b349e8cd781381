"""gan-dist: distributed multi-GPU GAN training on accelerate, webdataset and W&B."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `gan_dist.load_generator` is imported on first use: `import gan_dist.files` and the other light modules must
    # not pull in torch and huggingface_hub through this package's __init__.
    if name == "load_generator":
        from gan_dist.export import load_generator

        return load_generator
    raise AttributeError(f"module 'gan_dist' has no attribute '{name}'")
