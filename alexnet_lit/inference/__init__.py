"""Using a trained checkpoint: predict image files, export the network, and import the
tutorial's own ``alexnet.pt``."""
