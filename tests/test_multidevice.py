"""The whole VQ-VAE on 8 devices (forced CPU devices): the quantizer's statistics cover the global
batch, and XLA:CPU's blocks keep it sharded. Each quantizer alone under jit and shard_map:
test_quantizer_contract.py.

conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vqvae_jax import VQVAE

SMALL = dict(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=8, num_embeddings=32,
             embedding_dim=8, decay=0.9)


def train_call(model, variables, x):
  (recon, vq), updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  return recon, vq.perplexity, vq.code_counts, updates['batch_stats']


def test_jit_over_a_sharded_batch_equals_one_device(mesh):
  model = VQVAE(**SMALL)
  x = jax.random.uniform(jax.random.key(0), (16, 16, 16, 3)) - 0.5
  variables = model.init(jax.random.key(1), x)
  single = jax.jit(train_call, static_argnums=0)(model, variables, x)
  replicated = NamedSharding(mesh, P())
  sharded_x = jax.device_put(x, NamedSharding(mesh, P('data')))
  sharded = jax.jit(train_call, static_argnums=0,
                    out_shardings=(NamedSharding(mesh, P('data')), replicated, replicated,
                                   replicated))(model, jax.device_put(variables, replicated),
                                                sharded_x)
  assert len(sharded[0].sharding.device_set) == 8
  chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sharded[2].sum(), 16 * 4 * 4)  # global counts


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU property')
def test_cpu_blocks_keep_a_sharded_batch_on_its_devices(mesh):
  """On CPU, kernel gradients (the 8 -> 16 4x4 convolution) and the code search run over
  blocks of rows. The blocks are strided, so a batch sharded over 8 devices stays sharded in
  each and no device gathers the batch; with contiguous blocks XLA gathered it 17 times and
  the seed's step took 2.5x as long. The gradients equal those on one device."""
  model = VQVAE(**SMALL)
  x = jax.random.uniform(jax.random.key(0), (128, 32, 32, 3)) - 0.5
  variables = model.init(jax.random.key(1), x)

  def grads(variables, x):
    def loss(params):
      (recon, vq), _ = model.apply({**variables, 'params': params}, x, train=True,
                                   mutable=['batch_stats'])
      return jnp.mean((recon - x)**2) + vq.loss
    return jax.grad(loss)(variables['params'])

  replicated = NamedSharding(mesh, P())
  sharded_grads = jax.jit(grads, in_shardings=(replicated, NamedSharding(mesh, P('data'))),
                          out_shardings=replicated)
  hlo = sharded_grads.lower(variables, x).compile().as_text()
  assert ' while(' in hlo  # the blocks' loops
  assert ' all-gather(' not in hlo
  chex.assert_trees_all_close(sharded_grads(variables, x), jax.jit(grads)(variables, x),
                              rtol=1e-4, atol=1e-5)
