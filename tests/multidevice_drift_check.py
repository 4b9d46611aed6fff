"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4 by test_multidevice.py.

Why meshes drift apart on ResNet-18 (issue 24: 2x2 and 1x4 devices ended one epoch apart) while
the tiny arch agrees: trains a few DP-SGD steps of ResNet-18 from scratch on 1 and 4 devices
of one process from the same keys and batches, and a 1-device run whose initial parameters are
perturbed by one part in 1e7 (float32 rounding level). Prints, per step, the largest parameter
difference of each pair as JSON.
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


def params_per_step(config, data, mesh, num_steps, relative_perturbation=0.0):
  run = train.build_run(config, data, mesh, secret_keys.reproducible_secret_key(0, 'drift'))
  state = run.state
  if relative_perturbation:
    state = state.replace(params=jax.tree.map(lambda p: p * (1 + relative_perturbation),
                                              state.params))
  params = []
  for step in range(num_steps):
    indices, mask = run.sampler.sample(step)
    state, _ = run.train_step(state, steps.load_batch(data.train, indices, mask, mesh))
    params.append(jax.device_get(state.params))
  return params


def max_difference(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(data_dir, num_steps=6):
  assert jax.device_count() == 4, jax.devices()
  config = default.get_config()
  config.update(dataset='pneumonia', mech='dpsgd', beta=1.0, data_dir=data_dir, epochs=1,
                image_size=32, batch_size=16, microbatch_size=8, arch='resnet18', weights='none',
                norm='group_norm', learning_rate=0.5, momentum=0.9, progress=False)
  data = datasets.load_dataset('pneumonia', data_dir, 32)
  devices = jax.devices()
  one, four = (params_per_step(config, data, parallel.make_mesh(devices[:n]), num_steps)
               for n in (1, 4))
  perturbed = params_per_step(config, data, parallel.make_mesh(devices[:1]), num_steps,
                              relative_perturbation=1e-7)
  print(json.dumps({
      'scale': [max(float(np.max(np.abs(x))) for x in jax.tree.leaves(p)) for p in one],
      'one_vs_four': [max_difference(a, b) for a, b in zip(one, four)],
      'one_vs_perturbed_init': [max_difference(a, b) for a, b in zip(one, perturbed)]}))


if __name__ == '__main__':
  main(sys.argv[1])
