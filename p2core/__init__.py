"""p2core: a Ray-free PyTorch implementation of P2-weighted diffusion training (Choi et al., CVPR 2022)."""

__version__ = "0.1.0"
