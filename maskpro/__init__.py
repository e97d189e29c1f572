"""maskpro: learn strict N:M sparsity masks for causal LMs (MaskPro), export and serve them."""

__version__ = "0.1.0"
