"""ramserve: fit a large language model to the memory a machine really has, and serve it."""

__version__ = "0.1.0"
