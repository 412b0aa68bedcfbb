"""vqvae_jax: the VQ-VAE of van den Oord et al. (2017) in JAX/Flax Linen."""

from vqvae_jax.codebook import usage_metrics
from vqvae_jax.model import RECOMMENDED, VQVAE, Decoder, Encoder
from vqvae_jax.quantizers import (CodebookOptions, QuantizerOutput, VectorQuantizer,
                                  VectorQuantizerEMA, merge_codebook_offset)

__all__ = ['VQVAE', 'Encoder', 'Decoder', 'VectorQuantizer', 'VectorQuantizerEMA',
           'CodebookOptions', 'QuantizerOutput', 'RECOMMENDED', 'merge_codebook_offset',
           'usage_metrics']
__version__ = '0.1.0'
