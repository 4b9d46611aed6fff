"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4 by test_multidevice.py.

Trains a few DP-SGD steps on a 1-device mesh and on a 4-device mesh from the same keys and
batches, and prints the largest parameter difference as JSON.
"""

import json
import sys

import jax
import numpy as np

from dpjax import secret_keys
from dpjax.data import datasets
from experiments import parallel
from experiments import steps
from experiments import train
from experiments.configs import default


def final_params(config, data, mesh, num_steps):
  # The same secret key on both meshes, so that noise and sampling must match.
  run = train.build_run(config, data, mesh, secret_keys.reproducible_secret_key(0, 'mesh'))
  state = run.state
  for step in range(num_steps):
    indices, mask = run.sampler.sample(step)
    state, metrics = run.train_step(state, steps.load_batch(data.train, indices, mask, mesh))
  params = jax.device_get(state.params)
  evaluation = steps.evaluate(run.eval_step, state.params, state.batch_stats, data.test, 8, mesh)
  return params, evaluation['probs'], jax.device_get(metrics)


def main(data_dir):
  assert jax.device_count() == 4, jax.devices()
  report = {}
  # DP-SGD only (none and ldp: tests/test_multihost.py): with the noise added once per logical
  # batch, 4 devices equal 1; noise drawn per device would show here.
  for mech in ('dpsgd',):
    config = default.get_config()
    config.update(dataset='pneumonia', mech=mech, beta=1.0, data_dir=data_dir, epochs=1,
                  image_size=32, batch_size=8, microbatch_size=4, arch='tiny', weights='none',
                  progress=False)
    data = datasets.load_dataset('pneumonia', data_dir, 32)
    one = final_params(config, data, parallel.make_mesh(jax.devices()[:1]), num_steps=3)
    four = final_params(config, data, parallel.make_mesh(jax.devices()), num_steps=3)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), one[0], four[0]))
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(one[0]))
    report[mech] = {'max_param_diff': max(diffs), 'param_scale': scale,
                    'max_prob_diff': float(np.max(np.abs(one[1] - four[1]))),
                    'metrics_equal': {k: float(one[2][k]) == float(four[2][k]) for k in one[2]
                                      if k in ('count', 'correct')}}
  print(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv[1])
