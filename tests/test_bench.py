"""train.bench on a tiny config, and the property that keeps a scanned training step fast."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.bench import device, jax_side, measure, report, torch_side
from train.bench.__main__ import parse_args
from train.step import create_train_state, make_train_step
from vqvae_jax import VQVAE

TINY = dict(num_hiddens=8, num_residual_layers=1, num_residual_hiddens=4, num_embeddings=16,
            embedding_dim=4, commitment_cost=0.25)


@pytest.mark.parametrize('quantizer,dtype', [('ema', 'float32'), ('plain', 'bfloat16')])
def test_jax_measurement_and_report(quantizer, dtype):
  measurement = jax_side.bench_jax(quantizer, batch_size=2, dtype=dtype, steps=1,
                                   model_config=TINY, image_size=8)
  assert measurement.images_per_s > 0 and measurement.flops_per_step > 0
  assert measurement.peak_memory_mb > 0
  results = dict(device=device.device_description(), peak_note='test', memory_source='test',
                 measurements=[vars(measurement)], ratios=report.ratios([measurement]),
                 large_codebook=None)
  assert results['ratios'][0]['jax_over_torch_eager'] is None  # no torch measured
  assert f'| {quantizer} | 2 | {dtype} |' in report.markdown(results)


def test_steps_per_dispatch_reports_per_optimizer_step():
  one = jax_side.prepare_jax('ema', batch_size=2, dtype='float32', model_config=TINY, image_size=8)
  four = jax_side.prepare_jax('ema', batch_size=2, dtype='float32', model_config=TINY,
                              image_size=8, steps_per_dispatch=4)
  # A scan body counts once in XLA's cost analysis; the FLOPs must still be one step's.
  assert four.measurement.flops_per_step == pytest.approx(one.measurement.flops_per_step,
                                                           rel=0.02)
  calls = []
  run_four_steps = four.run
  four.run = lambda: calls.append(1) or run_four_steps()
  measurement = measure.time_interleaved([four], steps=8, rounds=1)[0]
  assert len(calls) == 2  # 8 optimizer steps, four per call
  assert measurement.steps_per_dispatch == 4 and measurement.step_ms > 0


def test_step_flops_count_whole_batches_not_the_cpus_loop_bodies():
  """On CPU, the kernel gradient of the 8 -> 16 4x4 convolution is summed over two blocks of 32
  images at batch 64, in a loop whose body XLA's cost analysis counts once; the FLOPs are those
  of the whole-batch form, so they double from batch 32 to 64 as the work does."""
  model = VQVAE(**{**TINY, 'num_hiddens': 16}, decay=0.99)
  tx = optax.adam(1e-3)
  train_steps = jax.jit(make_train_step(model, tx))
  flops = {}
  for batch_size in (32, 64):
    images = np.zeros((1, batch_size, 32, 32, 3), np.uint8)
    state = create_train_state(model, tx, jax.random.key(0), images[0])
    flops[batch_size] = jax_side.step_flops(train_steps, state, images, jnp.float32(1.0))
  assert flops[64] == pytest.approx(2 * flops[32], rel=0.01)


def test_ratios_compare_the_same_dtype():
  """A bfloat16 JAX row is divided by PyTorch's bfloat16 (autocast) figure, not its float32."""
  measured = lambda framework, dtype, images_per_s: measure.Measurement(
      framework, 'ema', 32, dtype, images_per_s=images_per_s)
  rows = report.ratios([measured('torch eager', 'float32', 100.0),
                        measured('torch eager', 'bfloat16', 400.0),
                        measured('torch.compile', 'bfloat16', 800.0),
                        measured('jax', 'float32', 200.0), measured('jax', 'bfloat16', 200.0)])
  by_dtype = {row['dtype']: row for row in rows}
  assert by_dtype['float32']['jax_over_torch_eager'] == 2.0
  assert by_dtype['float32']['jax_over_torch_compile'] is None
  assert by_dtype['bfloat16']['jax_over_torch_eager'] == 0.5
  assert by_dtype['bfloat16']['jax_over_torch_compile'] == 0.25


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU estimate')
@pytest.mark.parametrize('flags,bfloat16_over_float32', [({'avx512f'}, 1),
                                                         ({'avx512f', 'avx512_bf16'}, 2)])
def test_cpu_peak_counts_bfloat16_dot_products_where_the_cpu_has_them(
    monkeypatch, flags, bfloat16_over_float32):
  monkeypatch.setattr(device, '_cpu_flags', lambda: flags)
  monkeypatch.setattr(device, '_cpu_mhz', lambda: 1000.0)
  float32_peak, _ = device.peak_tflops('float32')
  bfloat16_peak, note = device.peak_tflops('bfloat16')
  cores = device.os.cpu_count()
  assert float32_peak == pytest.approx(cores * 1e9 * 64 / 1e12)
  assert bfloat16_peak == pytest.approx(bfloat16_over_float32 * float32_peak)
  assert ('avx512_bf16' in note) == (bfloat16_over_float32 == 2)


def test_large_codebook_chunked_equals_direct():
  result = jax_side.bench_large_codebook(num_vectors=300, num_codes=64, dim=8, chunk_size=128,
                                         subset=100)
  assert result['indices_equal_on_subset'] == 100
  assert result['distance_matrix_mb_direct_full_theoretical'] == 300 * 64 * 4 / 2**20


def test_flags_pick_a_subset():
  args = parse_args(['--batch_sizes=256', '--dtypes=float32', '--quantizers=ema', '--steps=5',
                     '--no-torch'])
  assert (args.batch_sizes, args.dtypes, args.quantizers, args.steps, args.torch) == (
      [256], ['float32'], ['ema'], 5, False)
  with pytest.raises(SystemExit):
    parse_args(['--quantizers=fsq'])


@functools.lru_cache(maxsize=None)
def scanned_step_hlo(batch_size: int) -> str:
  """The compiled HLO of `train_steps` for the tiny model on the seed's 32x32 images (on tiny
  images XLA swaps convolution operands on its own). Up to 64 images, XLA:CPU runs the narrow
  3x3 convolutions as matmuls; 96 images take their convolution form, with kernel gradients
  summed over blocks of 32 images, a loop inside the scan."""
  model = VQVAE(**TINY, decay=0.99)
  tx = optax.adam(1e-3)
  images = np.zeros((2, batch_size, 32, 32, 3), np.uint8)
  state = create_train_state(model, tx, jax.random.key(0), images[0])
  return jax.jit(make_train_step(model, tx)).lower(state, images,
                                                    jnp.float32(1.0)).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU property')
@pytest.mark.parametrize('batch_size,min_convolutions', [(2, 7), (96, 18)])
def test_scanned_step_has_only_canonical_convolutions(batch_size, min_convolutions):
  """XLA:CPU makes convolutions NHWC/HWIO only in the entry computation; any other layout left
  in the scan body of `train_steps` runs in XLA's naive loops, 60x slower (see `conv2d`)."""
  dim_labels = re.findall(r' convolution\(.*?dim_labels=([^,\s]+)', scanned_step_hlo(batch_size))
  assert len(dim_labels) >= min_convolutions  # the rest are matmuls
  assert set(dim_labels) == {'b01f_01io->b01f'}


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU property')
def test_kernel_gradient_transposes_are_not_fused_with_their_producers():
  """The transposes in front of kernel gradients (in `conv2d`'s CPU branch) are not fused with
  the bias and ReLU that produce their input: fused, XLA:CPU runs them as loops 3-20x slower
  (see `convolutions._unfused`)."""
  hlo = scanned_step_hlo(96)
  assert hlo.count(' conditional(') >= 3  # the 3x3 kernel gradients' transposes run in one
  kernel_grad_transpose = re.compile(r' transpose\(.*op_name="[^"]*/cond/branch_0_fun/transpose"')
  computations = re.split(r'\n(?=%\S+ \()', hlo)
  assert not [c for c in computations if ' maximum(' in c and kernel_grad_transpose.search(c)]


def test_torch_compile_retry_patches_exactly_the_seeds_scatters():
  """The fallback for Inductor's int64 one-hot changes the seed's two `scatter_` calls only."""
  source = torch_side.SEED_TORCH.read_text(encoding='utf-8')
  assert source.count(torch_side.SEED_SCATTER) == 2
  patched = source.replace(torch_side.SEED_SCATTER, torch_side.FLOAT_SCATTER)
  changed = [(a, b) for a, b in zip(source.splitlines(), patched.splitlines()) if a != b]
  assert len(changed) == 2 and all(b == a.replace(', 1)', ', 1.0)') for a, b in changed)


def test_lfq_bit_shares_find_a_dead_bit_from_code_counts():
  from train.lfq_bit_usage import bit_shares  # pylint: disable=g-import-not-at-top
  counts = np.zeros(8)
  counts[[0b001, 0b011, 0b101, 0b111]] = [1, 3, 2, 2]  # bit 0 always set; bit 1 in 5 of 8
  np.testing.assert_allclose(bit_shares(counts, 3), [1.0, 5 / 8, 4 / 8])


def test_lfq_bit_usage_trains_and_reports_every_bit(capsys):
  from train import lfq_bit_usage  # pylint: disable=g-import-not-at-top
  lfq_bit_usage.main(['--bits=9', '--steps=2'])
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert re.match(r'LFQ at 9 bits, seed 0, 2 steps: held-out NMSE \d\.\d{4}, \d+ codes used, '
                  r'\d dead bits; share of \+1 per bit: (\d\.\d\d, ){8}\d\.\d\d$', line), line
