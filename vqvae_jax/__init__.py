"""vqvae_jax: the VQ-VAE of van den Oord et al. (2017) in JAX/Flax Linen."""

from vqvae_jax.codebook import usage_metrics
from vqvae_jax.fsq import FSQ
from vqvae_jax.lfq import LFQ
from vqvae_jax.model import QUANTIZERS, RECOMMENDED, VQVAE, Decoder, Encoder
from vqvae_jax.quantizer_api import Quantizer, QuantizerOutput
from vqvae_jax.quantizers import (CodebookOptions, VectorQuantizer, VectorQuantizerEMA,
                                  merge_codebook_offset)
from vqvae_jax.residual import ResidualVQ

__all__ = ['VQVAE', 'Encoder', 'Decoder', 'VectorQuantizer', 'VectorQuantizerEMA', 'FSQ',
           'LFQ', 'ResidualVQ', 'QUANTIZERS', 'CodebookOptions', 'Quantizer', 'QuantizerOutput',
           'RECOMMENDED', 'merge_codebook_offset', 'usage_metrics']
__version__ = '0.1.0'
