"""vqvae_jax: the VQ-VAE of van den Oord et al. (2017) in JAX/Flax Linen."""

from vqvae_jax.model import VQVAE, Decoder, Encoder
from vqvae_jax.quantizers import QuantizerOutput, VectorQuantizer, VectorQuantizerEMA

__all__ = ['VQVAE', 'Encoder', 'Decoder', 'VectorQuantizer', 'VectorQuantizerEMA',
           'QuantizerOutput']
__version__ = '0.1.0'
