"""cytosae: sparse autoencoders for hematology foundation models."""
__version__ = "0.1.0"
