"""Bad inputs, in one place: every public entry and command line, each with a value a little off
the paths that the other tests walk, and what it must give: one clear error line, or the NaN
that its docstring promises. A row is `(call, bad value, expected)`.

The library rows call the functions in this process. The command-line rows run a few real
processes, to prove the whole contract (exit status 2, one `error:` line, no traceback, nothing
written in the workdir); the config checks behind them are rows that call the programs'
`train_and_evaluate` directly.
"""

import os
import re
import subprocess
import sys
import tracemalloc
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import XLA_FLAGS_FOR_DEVICES
from train import data, input_pipeline, prior_step, prior_training, trainer
from train.checkpoints import Checkpoints, write_run_info
from train.errors import UserError
from train.step import create_train_state, make_optimizer, model_from_config
from vqvae_jax import VQVAE
from vqvae_jax.autoregressive_prior import CodePrior, baseline_bits_per_code, filter_logits, sample
from vqvae_jax.convert import from_seed_state_dict, seed_architecture, to_seed_state_dict
from vqvae_jax.fsq import FSQ
from vqvae_jax.lfq import LFQ
from vqvae_jax.quantizers import VectorQuantizer, VectorQuantizerEMA
from vqvae_jax.residual import ResidualVQ

from tests.test_prior_training import tiny_prior_config
from tests.test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, GRID = 16, (3, 4)
TINY_PRIOR = dict(width=16, depth=1, num_heads=2, mlp_ratio=2)
KEY = jax.random.key(0)


def _prior(**fields):
  prior = CodePrior(num_embeddings=K, grid_shape=GRID, **TINY_PRIOR, **fields)
  labels = jnp.zeros((1,), jnp.int32) if prior.num_classes else None
  return prior, prior.init(KEY, jnp.zeros((1, *GRID), jnp.int32), labels)['params']


QUANTIZERS = {
    'vq': VectorQuantizer(num_embeddings=8, embedding_dim=3),
    'ema': VectorQuantizerEMA(num_embeddings=8, embedding_dim=3, decay=0.9),
    'fsq': FSQ(levels=(3, 3, 3)),
    'lfq': LFQ(embedding_dim=3),
    'rvq': ResidualVQ(num_embeddings=8, embedding_dim=3, num_quantizers=2),
}
TINY_VQVAE = dict(num_hiddens=8, num_residual_layers=1, num_residual_hiddens=4,
                  num_embeddings=8, embedding_dim=4)


@pytest.fixture(scope='module')
def t():
  """Tiny initialised models: priors, quantizers, a VQ-VAE and its seed state_dict. Shared by
  the whole file: nine eager inits take 10 to 35 s on 2 shared cores, once."""
  vqvae = VQVAE(**TINY_VQVAE, decay=0.99)
  vqvae_variables = vqvae.init(KEY, jnp.zeros((1, 8, 8, 3)))
  return types.SimpleNamespace(
      prior=_prior(), conditional=_prior(num_classes=3),
      guided=_prior(num_classes=3, label_dropout=0.1),
      quantizers={name: (q, q.init(KEY, jnp.ones((2, 3)))) for name, q in QUANTIZERS.items()},
      vqvae=vqvae, vqvae_variables=vqvae_variables,
      state_dict=to_seed_state_dict(vqvae_variables,
                                    {**TINY_VQVAE, 'ema': True}))


def _sample(t, which='prior', **options):
  prior, params = getattr(t, which)
  return sample(prior, params, KEY, **{'num_samples': 2, **options})


def _apply(t, *args, which='prior', **kwargs):
  prior, params = getattr(t, which)
  return prior.apply({'params': params}, *args, **kwargs)


def _quantize(t, name, inputs, method=None):
  quantizer, variables = t.quantizers[name]
  return quantizer.apply(variables, inputs, method=method)


def _codes(value=0, shape=(2, *GRID), dtype=jnp.int32):
  return jnp.full(shape, value, dtype)


def _with(state_dict, key, value):
  return {**state_dict, key: value}


def _without(state_dict, key):
  return {k: v for k, v in state_dict.items() if k != key}


# (id, call, the error it raises, a regex its one line matches)
ERRORS = [
    # sample's options: finite numbers, numpy scalars included (item 1, item 2, also-fix list)
    ('temperature=0', lambda t: _sample(t, temperature=0), ValueError,
     r'temperature must be a finite number > 0, got 0'),
    ('temperature=float32(1e-46)', lambda t: _sample(t, temperature=np.float32(1e-46)),
     ValueError, r'temperature must be a finite number > 0, got 0\.0'),
    ('temperature=inf', lambda t: _sample(t, temperature=np.inf), ValueError,
     r'temperature must be a finite number > 0, got inf'),
    ("temperature='1'", lambda t: _sample(t, temperature='1'), ValueError,
     r"temperature must be a finite number > 0, got '1'"),
    ('top_p=1.5', lambda t: _sample(t, top_p=1.5), ValueError, r'top_p must be in \(0, 1\], got 1.5'),
    ('top_p=0', lambda t: _sample(t, top_p=0), ValueError, r'top_p must be in \(0, 1\], got 0'),
    ('top_p=nan', lambda t: _sample(t, top_p=np.nan), ValueError, r'top_p must be a number'),
    ('top_k=K+1', lambda t: _sample(t, top_k=K + 1), ValueError,
     rf'top_k must be an integer in \[1, {K}\] \(K\), got {K + 1}'),
    ('top_k=2.0', lambda t: _sample(t, top_k=2.0), ValueError, r'top_k must be an integer'),
    ('num_samples=0', lambda t: _sample(t, num_samples=0), ValueError,
     r'agree on one batch size >= 1'),
    ('num_samples=True', lambda t: _sample(t, num_samples=True), ValueError,
     r'num_samples must be an integer >= 1, got True'),
    ('guidance_scale=nan', lambda t: _sample(t, 'guided', labels=[0, 1], guidance_scale=np.nan),
     ValueError, r'guidance_scale must be a finite number, got nan'),
    ('guidance_scale=inf', lambda t: _sample(t, 'guided', labels=[0, 1], guidance_scale=np.inf),
     ValueError, r'guidance_scale must be a finite number, got inf'),
    ("guidance_scale='2'", lambda t: _sample(t, 'guided', labels=[0, 1], guidance_scale='2'),
     ValueError, r"guidance_scale must be a finite number, got '2'"),
    ('guidance without label dropout',
     lambda t: _sample(t, 'conditional', labels=[0, 1], guidance_scale=2.0), ValueError,
     r'needs labels and a prior trained with label_dropout > 0'),
    ('guidance without labels', lambda t: _sample(t, 'guided', guidance_scale=2.0), ValueError,
     r'needs labels'),
    # item 8: no unconditional model to sample from
    ('labels=None, label_dropout=0', lambda t: _sample(t, 'conditional'), ValueError,
     r'labels=None .*never trained \(label_dropout=0\)'),
    ('labels=1', lambda t: _sample(t, 'conditional', labels=1), ValueError,
     r'labels must have shape \[B\], got shape \(\)'),
    ('labels out of range', lambda t: _sample(t, 'conditional', num_samples=None, labels=[0, 3]),
     ValueError, r'labels holds 3; accepted: integers in \[0, 3\)'),
    ('labels float', lambda t: _sample(t, 'conditional', num_samples=None, labels=[0.0, 1.0]),
     TypeError, r'labels must be integers, got dtype float'),
    ('labels, unconditional prior', lambda t: _sample(t, labels=np.array([0, 1])), ValueError,
     r'this prior is unconditional'),
    ('prefix P > h*w', lambda t: _sample(t, prefix=np.zeros((2, 13), np.int32)), ValueError,
     r'P <= 12'),
    ('prefix and num_samples disagree', lambda t: _sample(t, num_samples=3,
                                                          prefix=np.zeros((2, 4), np.int32)),
     ValueError, r'agree on one batch size'),
    ('prefix code K', lambda t: _sample(t, prefix=np.full((2, 4), K)), ValueError,
     rf'got code {K} .*codes must be in \[0, {K}\)'),
    ('prefix float', lambda t: _sample(t, prefix=np.zeros((2, 4))), TypeError,
     r'codes must be integers'),
    # CodePrior: the library's one check_codes (TypeError for a dtype, ValueError for a value)
    ('codes K', lambda t: _apply(t, _codes(K)), ValueError,
     rf'CodePrior codes: got code {K} .*codes must be in \[0, {K}\)'),
    ('codes -1', lambda t: _apply(t, _codes(-1)), ValueError, r'got code -1'),
    ('codes float', lambda t: _apply(t, _codes(0, dtype=jnp.float32)), TypeError,
     r'CodePrior codes: codes must be integers in \[0, 16\), got dtype float32'),
    ('codes off by one row', lambda t: _apply(t, _codes(0, (2, 4, 4))), ValueError,
     r'shape \[B, 3, 4\].*\(2, 4, 4\)'),
    ('codes without batch axis', lambda t: _apply(t, _codes(0, GRID)), ValueError,
     r'shape \[B, 3, 4\].*\(3, 4\)'),
    ('labels to an unconditional prior', lambda t: _apply(t, _codes(), jnp.array([0, 1])),
     ValueError, r'this prior is unconditional'),
    ('bits_per_code codes K', lambda t: _apply(t, _codes(K), method=CodePrior.bits_per_code),
     ValueError, rf'got code {K}'),
    ('CodePrior num_heads', lambda t: CodePrior(K, GRID, width=32, num_heads=5), ValueError,
     r'num_heads=5 must divide width=32'),
    ('CodePrior grid_shape', lambda t: CodePrior(K, (3,)), ValueError,
     r'grid_shape must be \(h, w\)'),
    ('CodePrior label_dropout', lambda t: CodePrior(K, GRID, label_dropout=0.1), ValueError,
     r'label_dropout must be in \[0, 1\), and 0 without num_classes'),
    ('CodePrior dropout', lambda t: CodePrior(K, GRID, dropout=1.0), ValueError,
     r'dropout must be in \[0, 1\)'),
    ('CodePrior num_embeddings', lambda t: CodePrior(0, GRID), ValueError,
     r'num_embeddings must be a positive integer'),
    # item 5: the baselines refuse what they cannot count
    ('baseline code -1', lambda t: baseline_bits_per_code(np.zeros((2, 3, 4), int),
                                                          np.full((1, 3, 4), -1), K),
     ValueError, r'eval_codes: got code -1'),
    ('baseline code K', lambda t: baseline_bits_per_code(np.full((2, 3, 4), K),
                                                         np.zeros((1, 3, 4), int), K),
     ValueError, rf'train_codes: got code {K}'),
    ('baseline float codes', lambda t: baseline_bits_per_code(np.zeros((2, 3, 4)),
                                                              np.zeros((1, 3, 4), int), K),
     TypeError, r'codes must be integers'),
    ('baseline empty', lambda t: baseline_bits_per_code(np.zeros((2, 3, 4), int),
                                                        np.zeros((0, 3, 4), int), K),
     ValueError, r'eval_codes must be a non-empty \[N, h, w\] grid, got shape \(0, 3, 4\)'),
    # VQVAE
    ('encode uint8 images', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.ones((1, 8, 8, 3),
                                                                               jnp.uint8),
                                                    method=VQVAE.encode),
     TypeError, r'VQVAE expects float images .*got dtype uint8'),
    ('encode bool images', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.ones((1, 8, 8, 3), bool),
                                                   method=VQVAE.encode),
     TypeError, r'got dtype bool'),
    ('encode NaN images', lambda t: t.vqvae.apply(t.vqvae_variables,
                                                  jnp.full((1, 8, 8, 3), jnp.nan),
                                                  method=VQVAE.encode),
     ValueError, r'VQVAE.encode: images hold 192 NaN or infinite values'),
    ('encode inf images', lambda t: t.vqvae.apply(
        t.vqvae_variables, jnp.zeros((1, 8, 8, 3)).at[0, 0, 0, 0].set(jnp.inf),
        method=VQVAE.encode), ValueError, r'images hold 1 NaN or infinite'),
    ('encode 9x9 images', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.ones((1, 9, 9, 3)),
                                                  method=VQVAE.encode),
     ValueError, r'H and W divisible by 4, got shape \(1, 9, 9, 3\)'),
    ('encode 4 channels', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.ones((1, 8, 8, 4)),
                                                  method=VQVAE.encode),
     ValueError, r'\[B, H, W, 3\].*got shape \(1, 8, 8, 4\)'),
    ('decode float codes', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.zeros((1, 2, 2)),
                                                   method=VQVAE.decode),
     TypeError, r'codes must be integers'),
    ('decode code K', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.full((1, 2, 2), 8),
                                              method=VQVAE.decode),
     ValueError, r'got code 8'),
    ('decode code -1', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.full((1, 2, 2), -1),
                                               method=VQVAE.decode),
     ValueError, r'got code -1'),
    ('decode [h, w]', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.zeros((2, 2), jnp.int32),
                                              method=VQVAE.decode),
     ValueError, r'VQVAE.decode expects codes of shape \[B, h, w\], got shape \(2, 2\)'),
    # the quantizer families at their public __call__ and embed
    *[(f'{name} bool latents', lambda t, name=name: _quantize(t, name, jnp.ones((2, 3), bool)),
       TypeError, r'expects floating-point inputs, got bool') for name in QUANTIZERS],
    *[(f'{name} latents [2, 4]', lambda t, name=name: _quantize(t, name, jnp.ones((2, 4))),
       ValueError, r'expects inputs of shape \[\.\.\., 3\].*got shape \(2, 4\)')
      for name in QUANTIZERS],
    *[(f'{name}.embed float codes',
       lambda t, name=name: _quantize(t, name, jnp.zeros((2,)), type(QUANTIZERS[name]).embed),
       TypeError, r'codes must be integers') for name in QUANTIZERS],
    # the converters
    ('from_seed missing key', lambda t: from_seed_state_dict(_without(t.state_dict, '_pre_vq_conv.bias')),
     ValueError, r"missing key '_pre_vq_conv.bias'"),
    ('from_seed wrong shape', lambda t: from_seed_state_dict(
        _with(t.state_dict, '_pre_vq_conv.bias', np.zeros(5, np.float32))),
     ValueError, r"key '_pre_vq_conv.bias' has shape \(5,\), expected \(4,\)"),
    ('from_seed strings', lambda t: from_seed_state_dict(
        _with(t.state_dict, '_pre_vq_conv.bias', np.array(['a'] * 4))),
     ValueError, r"seed state_dict key '_pre_vq_conv.bias' holds ndarray \(dtype <U1\); "
                 r'accepted: a float array'),
    ('from_seed unexpected key', lambda t: from_seed_state_dict(_with(t.state_dict, 'x', 0)),
     ValueError, r"unexpected key 'x'"),
    ('from_seed model differs', lambda t: from_seed_state_dict(
        t.state_dict, VQVAE(**{**TINY_VQVAE, 'num_embeddings': 9}, decay=0.99)),
     ValueError, r'num_embeddings=8 but the model has num_embeddings=9'),
    ('seed_architecture missing key', lambda t: seed_architecture({}), ValueError,
     r'missing key'),
    ('to_seed missing variable', lambda t: to_seed_state_dict(
        {'params': {}}, {**TINY_VQVAE, 'ema': True}),
     ValueError, r'variables lack params/encoder/conv_1/kernel'),
    ('to_seed architecture differs', lambda t: to_seed_state_dict(
        t.vqvae_variables, {**TINY_VQVAE, 'num_hiddens': 16, 'ema': True}),
     ValueError, r'variable params/encoder/conv_1/kernel has shape \(4, 3, 4, 4\) .*expected '
                 r'\(8, 3, 4, 4\)'),
]


@pytest.mark.parametrize('call, error, message', [row[1:] for row in ERRORS],
                         ids=[row[0] for row in ERRORS])
def test_a_bad_value_is_one_line_naming_it(t, call, error, message):
  with pytest.raises(error) as raised:
    call(t)
  text = str(raised.value)
  assert len(text.splitlines()) == 1, text
  assert re.search(message, text), text


def _nan_rows(x):
  """The rows of `x` `[N, D]` that hold a NaN."""
  return np.flatnonzero(np.isnan(np.asarray(x)).any(axis=-1)).tolist()


def _bits_under_jit(t, value):
  prior, params = t.prior
  codes = _codes(0).at[1, 2, 3].set(value)
  return jax.jit(lambda c: prior.apply({'params': params}, c, method=CodePrior.bits_per_code))(
      codes)


# (id, call, the rows or examples that must be NaN, and no others)
NANS = [
    # also-fix list: under jit, -1 gives NaN as K does, not the last code's log-probability
    ('bits_per_code code -1 under jit', lambda t: _bits_under_jit(t, -1)[:, None], [1]),
    ('bits_per_code code K under jit', lambda t: _bits_under_jit(t, K)[:, None], [1]),
    ('decode code K under jit', lambda t: jax.jit(
        lambda c: t.vqvae.apply(t.vqvae_variables, c, method=VQVAE.decode))(
            jnp.zeros((2, 1, 1), jnp.int32).at[1].set(8)).reshape(2, -1), [1]),
    ('VQVAE NaN pixel', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.zeros((2, 8, 8, 3)).at[
        1, 0, 0, 0].set(jnp.nan))[0].reshape(2, -1), [1]),
    *[(f'{name} NaN latent', lambda t, name=name: _quantize(
        t, name, jnp.ones((2, 3)).at[1, 0].set(jnp.nan)).quantized, [1])
      for name in ('vq', 'ema', 'lfq', 'rvq')],
    *[(f'{name} inf latent', lambda t, name=name: _quantize(
        t, name, jnp.ones((2, 3)).at[0, 0].set(jnp.inf)).quantized, [0])
      for name in ('vq', 'ema', 'lfq', 'rvq')],
    *[(f'{name}.embed code -1 under jit', lambda t, name=name: jax.jit(
        lambda i: _quantize(t, name, i, type(QUANTIZERS[name]).embed))(
            jnp.array([0, -1] if name != 'rvq' else [[0, 0], [0, 8]])), [1])
      for name in QUANTIZERS],
]


@pytest.mark.parametrize('call, nan_rows', [row[1:] for row in NANS],
                         ids=[row[0] for row in NANS])
def test_a_bad_value_gives_the_documented_nan(t, call, nan_rows):
  assert _nan_rows(call(t)) == nan_rows


EMPTY = [
    *[(f'{name} no latents', lambda t, name=name: _quantize(t, name, jnp.zeros((0, 3))).quantized,
       (0, 3)) for name in QUANTIZERS],
    ('encode no images', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.zeros((0, 8, 8, 3)),
                                                 method=VQVAE.encode), (0, 2, 2)),
    ('decode no codes', lambda t: t.vqvae.apply(t.vqvae_variables, jnp.zeros((0, 2, 2), jnp.int32),
                                                method=VQVAE.decode), (0, 8, 8, 3)),
    ('bits_per_code no grids', lambda t: _apply(t, _codes(0, (0, *GRID)),
                                                method=CodePrior.bits_per_code), (0,)),
]


@pytest.mark.parametrize('call, shape', [row[1:] for row in EMPTY], ids=[row[0] for row in EMPTY])
def test_an_empty_batch_gives_an_empty_result(t, call, shape):
  chex.assert_shape(call(t), shape)


# ---- What each fixed value now gives, in numbers. ----


@pytest.mark.parametrize('temperature', [1e-30, 1e-38, 1e-45, 1e-46])
def test_a_tiny_temperature_samples_the_most_likely_codes(t, temperature):
  """Item 1: as the temperature goes to 0, sampling goes to the argmax (top_k=1), for the
  conditional and the guided model alike; before, `logits / 1e-38` overflowed to garbage."""
  greedy = _sample(t, 'guided', num_samples=None, labels=[0, 2], top_k=1)
  tiny = _sample(t, 'guided', num_samples=None, labels=[0, 2], temperature=temperature)
  np.testing.assert_array_equal(tiny, greedy)
  guided = dict(num_samples=None, labels=[0, 2], guidance_scale=3.0)
  np.testing.assert_array_equal(_sample(t, 'guided', temperature=temperature, **guided),
                                _sample(t, 'guided', top_k=1, **guided))


def test_top_p_one_keeps_every_code_and_top_p_zero_keeps_the_most_likely():
  """Also-fix list: a float32 cumulative sum reaches 1 before the last of 512 codes, so top_p=1
  dropped the least likely; `top_p=0` kept every code while 1e-12 kept one."""
  logits = 8 * jax.random.normal(KEY, (4, 512))
  np.testing.assert_array_equal(filter_logits(logits, top_p=jnp.float32(1.0)), logits)
  for top_p in (0.0, 1e-12):
    kept = filter_logits(logits, top_p=jnp.float32(top_p)) > -jnp.inf
    np.testing.assert_array_equal(kept, logits == logits.max(axis=1, keepdims=True))


def test_numpy_scalars_are_numbers(t):
  """Also-fix list: numpy scalars were refused; they sample what Python numbers do."""
  as_numpy = _sample(t, num_samples=np.int64(2), temperature=np.float32(0.5), top_k=np.int64(3),
                     top_p=np.float64(0.9))
  np.testing.assert_array_equal(as_numpy, _sample(t, temperature=0.5, top_k=3, top_p=0.9))


def test_codeprior_takes_a_list_of_codes(t):
  """Also-fix list: a list passed the checks, then failed with AttributeError."""
  grids = np.arange(2 * 12).reshape(2, *GRID) % K
  np.testing.assert_allclose(_apply(t, grids.tolist()), _apply(t, jnp.asarray(grids)))


def _dense_bigram_bits(train, held_out, k):
  """The reference: a dense k x k table of add-one smoothed bigram counts."""
  unigram = np.log2((np.bincount(train.ravel(), minlength=k) + 1.0) /
                    (train.size + k))
  pairs = np.ones((k, k))
  np.add.at(pairs, (train[:, :, :-1].ravel(), train[:, :, 1:].ravel()), 1.0)
  table = np.log2(pairs / pairs.sum(axis=1, keepdims=True))
  return -(unigram[held_out[:, :, 0]].sum() +
           table[held_out[:, :, :-1], held_out[:, :, 1:]].sum()) / held_out.size


def test_bigram_baseline_counts_only_the_pairs_that_occur():
  """Item 5: the same bits as a dense table at K=64, and at K=65,536 (a 32 GiB dense float64
  table) a peak of a few MiB for 256 grids of 8x8."""
  rng = np.random.default_rng(0)
  train, held_out = rng.integers(0, 64, (200, 4, 5)), rng.integers(0, 64, (30, 4, 5))
  held_out[:, :, 1:] = train[:30, :, 1:]  # pairs seen in training, and unseen ones
  bits = baseline_bits_per_code(train, held_out, 64)
  assert bits['bigram'] == pytest.approx(_dense_bigram_bits(train, held_out, 64), rel=1e-12)
  k = 65_536
  train, held_out = rng.integers(0, k, (256, 8, 8)), rng.integers(0, k, (64, 8, 8))
  tracemalloc.start()
  try:
    bits = baseline_bits_per_code(train, held_out, k)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 16 * 2**20, peak
  assert bits['uniform'] == 16 and 16 < bits['bigram'] < 17.5


def _folder(root, classes):
  """PNG files `root/<class>/<name>.png` of 8x8 pixels, each a constant value; bad ones empty."""
  values = {}
  for value, (label, name, good) in enumerate(classes):
    path = root / label / f'{name}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    if good:
      Image.fromarray(np.full((8, 8, 3), 10 * value + 10, np.uint8)).save(path)
      values[f'{label}/{name}'] = 10 * value + 10
    else:
      path.write_bytes(b'')
  return values


def test_a_skipped_file_is_replaced_by_a_file_of_its_own_class(tmp_path):
  """Item 4: `a/a1` is bad and the last of class `a`: its row holds `a/a0`, not `b/b0`."""
  values = _folder(tmp_path / 'f', [('a', 'a0', True), ('a', 'a1', False), ('b', 'b0', True),
                                    ('b', 'b1', True)])
  index = data._scan_folder(str(tmp_path / 'f'))  # pylint: disable=protected-access
  _, labels, _ = data._folder_classes(index['paths'], index['paths'])  # pylint: disable=protected-access
  source = input_pipeline.FolderSource(str(tmp_path / 'f'), index['paths'], labels, 0, (8, 8, 3))
  assert [os.fsdecode(p) for p in source.paths] == ['a/a0.png', 'a/a1.png', 'b/b0.png',
                                                    'b/b1.png']
  np.testing.assert_array_equal(source.labels, [0, 0, 1, 1])
  rows = source.rows(np.arange(4))
  np.testing.assert_array_equal(rows[:, 0, 0, 0], [values['a/a0'], values['a/a0'],
                                                   values['b/b0'], values['b/b1']])


def test_a_decompression_bomb_is_skipped_and_each_bad_file_logged_once(tmp_path, monkeypatch):
  """Item 7: PIL's DecompressionBombError is no OSError, and stopped the run; a bad file read
  again (every epoch, every worker) added a line to the log each time."""
  values = _folder(tmp_path / 'f', [('a', 'big', True), ('a', 'ok', True), ('a', 'bad', False)])
  big = tmp_path / 'f' / 'a' / 'big.png'
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(big)  # 1,024 pixels: a bomb below
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 256)  # PIL refuses over 2x this: 512
  index = data._scan_folder(str(tmp_path / 'f'))  # pylint: disable=protected-access
  log = tmp_path / 'skipped.txt'
  source = input_pipeline.FolderSource(str(tmp_path / 'f'), index['paths'], None, 8, (8, 8, 3),
                                       skipped_log=str(log))
  assert [os.fsdecode(p) for p in source.paths] == ['a/bad.png', 'a/big.png', 'a/ok.png']
  for _ in range(3):  # three epochs
    np.testing.assert_array_equal(source.rows(np.arange(3))[:, 0, 0, 0], [values['a/ok']] * 3)
  again = input_pipeline.FolderSource(str(tmp_path / 'f'), index['paths'], None, 8, (8, 8, 3),
                                      skipped_log=str(log))  # another worker
  again.rows(np.arange(3))
  lines = log.read_text().splitlines()
  assert [line.split('\t')[0] for line in lines] == [str(tmp_path / 'f' / 'a' / 'bad.png'),
                                                     str(big)]
  assert 'DecompressionBombError' in lines[1]


# ---- Config errors: one line before the workdir is written (docs/configuration.md). ----


def _untouched(workdir):
  return not workdir.exists() or os.listdir(workdir) == ['precious.txt']


@pytest.fixture
def workdir(tmp_path):
  path = tmp_path / 'run'
  path.mkdir()
  (path / 'precious.txt').write_text('keep me')
  return path


VQVAE_CONFIG_ERRORS = [
    ('seed=-1', dict(seed=-1), r'config.seed=-1; accepted: an integer >= 0'),
    ('data_workers=-1', dict(data_workers=-1), r'config.data_workers=-1; accepted'),
    ('data_on_device_max_bytes=-1', dict(data_on_device_max_bytes=-1),
     r'config.data_on_device_max_bytes=-1; accepted: an integer >= 0'),
    ('image_channels=2', dict(image_channels=2),
     r"config.image_channels=2; accepted: 0 \(the images' own\), 1 or 3"),
    ('model.quantizer.fsq.levels',
     dict(model=dict(quantizer=dict(family='fsq', fsq=dict(levels=(8, 1))))),
     r'config.model: every level must be an integer >= 2, got 1'),
]


@pytest.mark.parametrize('overrides, message', [row[1:] for row in VQVAE_CONFIG_ERRORS],
                         ids=[row[0] for row in VQVAE_CONFIG_ERRORS])
def test_a_bad_vqvae_config_value_is_one_line_before_the_workdir(workdir, overrides, message):
  config = tiny_config()
  model = overrides.pop('model', {})
  config.update(overrides)
  config.model.update(model)
  with pytest.raises(UserError) as raised:
    trainer.train_and_evaluate(config, str(workdir))
  assert len(str(raised.value).splitlines()) == 1 and re.search(message, str(raised.value))
  assert _untouched(workdir)


def _zeros_like_init(init_state):
  """The state `init_state()` returns, all zeros: its shapes without compiling it."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init_state))


def _save_run(workdir, config, facts, state):
  write_run_info(workdir, config, facts)
  checkpoints = Checkpoints(workdir, 1)
  checkpoints.save(0, state)
  checkpoints.close()


@pytest.fixture(scope='module')
def vqvae_workdir(tmp_path_factory):
  """A VQ-VAE run at step 0, with zero weights: its run.json and one checkpoint, for the checks
  that read the VQ-VAE (its K and code grid)."""
  workdir = str(tmp_path_factory.mktemp('vqvae'))
  config = tiny_config()
  model = model_from_config(config.model, 3)
  state = _zeros_like_init(lambda: create_train_state(
      model, make_optimizer(config), KEY, jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  _save_run(workdir, config, {'data_variance': 0.06, 'image_shape': [32, 32, 3]}, state)
  return workdir


@pytest.fixture(scope='module')
def prior_workdir(vqvae_workdir, tmp_path_factory):
  """A class-conditional prior without label dropout, zero weights, saved as a run is."""
  workdir = str(tmp_path_factory.mktemp('prior'))
  config = tiny_prior_config(vqvae_workdir)
  config.model.label_dropout = 0.0
  prior = prior_step.prior_from_config(config, K, (8, 8), 2)
  example = {'codes': jnp.zeros((1, 8, 8), jnp.int32), 'labels': jnp.zeros((1,), jnp.int32)}
  state = _zeros_like_init(lambda: prior_step.create_train_state(
      prior, prior_step.make_optimizer(config), KEY, example))
  _save_run(workdir, config, {'num_embeddings': K, 'grid_shape': [8, 8],
                              'class_names': ['cats', 'dogs'], 'vqvae_step': 0}, state)
  return workdir


PRIOR_CONFIG_ERRORS = [
    ('sample_top_k > K', dict(sample_top_k=1000),
     rf'config.sample_top_k=1000; accepted: an integer in \[0, {K}\]'),
    ('sample_temperature=inf', dict(sample_temperature=float('inf')),
     r'config.sample_temperature=inf; accepted: a finite number > 0'),
    ('seed=-1', dict(seed=-1), r'config.seed=-1; accepted: an integer >= 0'),
    ('warmup_steps=-1', dict(warmup_steps=-1), r'config.warmup_steps=-1; accepted'),
    ('weight_decay=-1', dict(weight_decay=-1.0), r'config.weight_decay=-1.0; accepted'),
    ('model.num_heads', dict(model=dict(num_heads=3)),
     r'config.model: CodePrior.num_heads=3 must divide width=16'),
    ('model.label_dropout', dict(model=dict(label_dropout=1.0)),
     r'config.model: CodePrior.label_dropout must be in \[0, 1\)'),
    ('model.unknown', dict(model=dict(depht=2)), r"config.model: .*'depht'"),
    ('model.label_dropout=0, held-out codes unlabelled', dict(model=dict(label_dropout=0.0)),
     r'config.model.label_dropout=0, but the held-out codes have no labels'),
    ('model.dtype', dict(model=dict(dtype='float8')), r"config.model.dtype='float8'"),
]


@pytest.mark.parametrize('overrides, message', [row[1:] for row in PRIOR_CONFIG_ERRORS],
                         ids=[row[0] for row in PRIOR_CONFIG_ERRORS])
def test_a_bad_prior_config_value_is_one_line_before_the_workdir(vqvae_workdir, workdir,
                                                                 overrides, message):
  """Item 6: sample_top_k above K failed at the first evaluation, and a bad model field (or
  label_dropout=0 with unlabelled held-out codes) after the dataset was encoded into the
  workdir."""
  config = tiny_prior_config(vqvae_workdir)
  model = overrides.pop('model', {})
  config.update(overrides)
  with config.model.unlocked():
    config.model.update(model)
  with pytest.raises(UserError) as raised:
    prior_training.train_and_evaluate(config, str(workdir))
  assert len(str(raised.value).splitlines()) == 1 and re.search(message, str(raised.value)), \
      str(raised.value)
  assert _untouched(workdir)


# ---- The command lines, end to end: exit 2, one `error:` line, no traceback. ----


def _run(module, *args):
  env = {**os.environ, 'XLA_FLAGS': XLA_FLAGS_FOR_DEVICES.format(1), 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


COMMAND_LINES = [
    ('train --config.seed=-1', 'train', lambda w: [
        '--config=train/configs/quickstart.py', f'--workdir={w["run"]}', '--config.seed=-1'],
     r'config.seed=-1; accepted: an integer >= 0'),
    ('train.prior --config.sample_top_k=1000', 'train.prior', lambda w: [
        '--config=train/configs/prior_quickstart.py', f'--workdir={w["run"]}',
        f'--config.vqvae_workdir={w["vqvae"]}', '--config.sample_top_k=1000'],
     rf'config.sample_top_k=1000; accepted: an integer in \[0, {K}\]'),
    ('train.sample --label none', 'train.sample', lambda w: [
        f'--workdir={w["prior"]}', f'--out={w["run"]}/x.png', '--label=none'],
     r'labels=None .*label_dropout=0'),
    ('train.sample --guidance_scale nan', 'train.sample', lambda w: [
        f'--workdir={w["prior"]}', f'--out={w["run"]}/x.png', '--label=cats',
        '--guidance_scale=nan'], r'guidance_scale must be a finite number, got nan'),
    ('train.sample --out x.npz', 'train.sample', lambda w: [
        f'--workdir={w["prior"]}', f'--out={w["run"]}/x.npz'],
     r"--out '.*x.npz'; accepted: a \.png path"),
    ('train.quantizer_study --seeds=a', 'train.quantizer_study', lambda w: [
        '--seeds=a', f'--out={w["run"]}/study'], r"--seeds='a'; accepted: integers >= 0"),
]


@pytest.mark.parametrize('module, args, message', [row[1:] for row in COMMAND_LINES],
                         ids=[row[0] for row in COMMAND_LINES])
def test_a_command_line_error_is_one_line_and_exit_status_2(vqvae_workdir, prior_workdir, workdir,
                                                            module, args, message):
  result = _run(module, *args({'run': workdir, 'vqvae': vqvae_workdir, 'prior': prior_workdir}))
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert re.search(message, lines[0]), lines[0]
  assert _untouched(workdir)
