"""train/xla_flags.py: the XLA:CPU option the training programs add to XLA_FLAGS."""

from train import xla_flags

OPTION = f'--{xla_flags.YNN_FUSION_FLAG}=' + ','.join(xla_flags.YNN_FUSION_TYPES)


def test_option_is_added_after_the_users_flags():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert xla_flags.use_measured_cpu_fusions(env, jaxlib_version='0.10.2')
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=8 {OPTION}'
  assert 'LIBRARY_FUSION_TYPE_ELTWISE' in env['XLA_FLAGS']
  assert not xla_flags.use_measured_cpu_fusions(env, jaxlib_version='0.10.2')  # once only
  assert env['XLA_FLAGS'].count(xla_flags.YNN_FUSION_FLAG) == 1


def test_option_is_set_on_an_empty_environment():
  env = {}
  assert xla_flags.use_measured_cpu_fusions(env, jaxlib_version='0.10.2')
  assert env == {'XLA_FLAGS': OPTION}


def test_users_own_value_wins():
  mine = f'--{xla_flags.YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
  env = {'XLA_FLAGS': mine}
  assert not xla_flags.use_measured_cpu_fusions(env, jaxlib_version='0.10.2')
  assert env == {'XLA_FLAGS': mine}


def test_unmeasured_jaxlib_gets_nothing():
  """An XLA that does not know an experimental flag aborts, so only measured versions get it."""
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  for version in ('0.11.2', '0.9.0', '1.10.0'):
    assert not xla_flags.use_measured_cpu_fusions(env, jaxlib_version=version)
  assert env == {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
