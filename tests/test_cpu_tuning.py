"""train/cpu_tuning.py: the XLA:CPU option and the allocator setting of the training programs."""

import platform
import subprocess
import sys
import textwrap

import pytest

from train import cpu_tuning

OPTION = f'--{cpu_tuning.YNN_FUSION_FLAG}=' + ','.join(cpu_tuning.YNN_FUSION_TYPES)


def test_option_is_added_after_the_users_flags():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert cpu_tuning.use_measured_cpu_fusions(env, jaxlib_version='0.10.2')
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=8 {OPTION}'
  assert 'LIBRARY_FUSION_TYPE_ELTWISE' in env['XLA_FLAGS']
  assert not cpu_tuning.use_measured_cpu_fusions(env, jaxlib_version='0.10.2')  # once only
  assert env['XLA_FLAGS'].count(cpu_tuning.YNN_FUSION_FLAG) == 1


def test_option_is_set_on_an_empty_environment():
  env = {}
  assert cpu_tuning.use_measured_cpu_fusions(env, jaxlib_version='0.10.2')
  assert env == {'XLA_FLAGS': OPTION}


def test_users_own_value_wins():
  mine = f'--{cpu_tuning.YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
  env = {'XLA_FLAGS': mine}
  assert not cpu_tuning.use_measured_cpu_fusions(env, jaxlib_version='0.10.2')
  assert env == {'XLA_FLAGS': mine}


def test_unmeasured_jaxlib_gets_nothing():
  """An XLA that does not know an experimental flag aborts, so only measured versions get it."""
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  for version in ('0.10.0', '0.10.1', '0.11.2', '0.12.0.1', '0.9.0', '1.10.0'):
    assert not cpu_tuning.use_measured_cpu_fusions(env, jaxlib_version=version)
  assert env == {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


class _RecordingLibc:

  def __init__(self, result=1):
    self.calls, self.result = [], result

  def mallopt(self, parameter, value):
    self.calls.append((parameter, value))
    return self.result


def test_keep_freed_memory_sets_every_mallopt_parameter():
  libc = _RecordingLibc()
  assert cpu_tuning.keep_freed_memory(libc)
  assert libc.calls == list(cpu_tuning.KEEP_FREED_MEMORY)
  assert (cpu_tuning.M_MMAP_MAX, 0) in libc.calls
  assert not cpu_tuning.keep_freed_memory(_RecordingLibc(result=0))  # glibc refused one


# A compiled program whose temporary of argv[2] MB (the first matmul's output, the second's
# input) is freed after every call; prints the page faults of each of 9 calls after the first.
# argv[1]: 'default' (glibc as it is) or 'apply' (the training programs' settings).
_PAGE_FAULTS_PER_CALL = textwrap.dedent("""
    import sys
    from train import cpu_tuning
    if sys.argv[1] == 'apply':
      assert cpu_tuning.apply(cpu_fusions=False)['keep_freed_memory']
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w[0, :, None]))
    x, w = jnp.ones((16384, 64)), jnp.ones((64, 16 * int(sys.argv[2])))
    f(x, w).block_until_ready()
    def minor_faults():
      return int(open('/proc/self/stat').read().split(')')[1].split()[7])
    for _ in range(9):
      before = minor_faults()
      f(x, w).block_until_ready()
      print(minor_faults() - before)
""")


def _page_faults_per_call(mode: str, temporary_mb: int):
  out = subprocess.run([sys.executable, '-c', _PAGE_FAULTS_PER_CALL, mode, str(temporary_mb)],
                       check=True, capture_output=True, text=True)
  faults = sorted(int(line) for line in out.stdout.split())
  assert len(faults) == 9
  return faults


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc\'s')
def test_kept_memory_lets_calls_reuse_their_pages():
  """Without the setting, every call faults the 48 MB temporary's 12,288 pages in again (it is
  over glibc's largest mmap threshold, 32 MB). With it, calls reuse them; on a loaded machine
  some calls still fault them in, so the bar is that some call takes none, which no call does
  without it."""
  assert min(_page_faults_per_call('default', 48)) >= 8000
  assert min(_page_faults_per_call('apply', 48)) <= 500


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc\'s')
def test_temporaries_larger_than_a_thread_arena_are_reused_with_synchronous_dispatch():
  """96 MB is over a thread arena's 64 MB heaps. With asynchronous dispatch the computation
  runs on one of JAX's threads, and `keep_freed_memory` alone left glibc mapping it afresh on
  every call in most runs (about 27,500 faults a call; in about one run of ten that thread
  shared the main arena and none); `apply` runs it on the calling thread, whose arena keeps it."""
  assert min(_page_faults_per_call('default', 96)) >= 16000
  assert min(_page_faults_per_call('apply', 96)) <= 500


@pytest.mark.skipif(not cpu_tuning.use_measured_cpu_fusions({}),
                    reason='no option for this jaxlib')
def test_option_gives_lone_convolutions_to_xla_and_elementwise_ops_to_ynnpack():
  """What was measured: a convolution on its own runs in XLA's kernels (faster than YNNPACK's
  here; XLA's default makes it a YNNPACK fusion), and one followed by bias and ReLU shares a
  YNNPACK fusion with them (the default leaves those to XLA's loop emitter)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('an XLA:CPU option')
  option = {cpu_tuning.YNN_FUSION_FLAG: ','.join(cpu_tuning.YNN_FUSION_TYPES)}
  x, kernel, bias = jnp.ones((8, 16, 16, 64)), jnp.ones((3, 3, 64, 64)), jnp.ones((64,))

  def conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def entry_ops(function, *args, **compile_options):
    text = jax.jit(function).lower(*args).compile(compile_options or None).as_text()
    entry = text[text.index('\nENTRY'):]
    return [line.split(' = ')[1].split('(')[0].split()[-1] + ('/ynn' if '__ynn_fusion' in line
                                                               else '')
            for line in entry.splitlines() if ' = ' in line and 'parameter(' not in line]

  assert entry_ops(conv, x, kernel) == ['fusion/ynn']
  assert entry_ops(conv, x, kernel, **option) == ['convolution']
  conv_bias_relu = lambda x, kernel, bias: jax.nn.relu(conv(x, kernel) + bias)
  assert entry_ops(conv_bias_relu, x, kernel, bias) == ['fusion/ynn', 'fusion']
  assert entry_ops(conv_bias_relu, x, kernel, bias, **option) == ['fusion/ynn']
