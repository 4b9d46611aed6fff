"""Run by tests/test_multihost.py as one process of a job (or as the whole job): trains none,
ldp and dpsgd in turn through `experiments.run.main`, into `<workdir>/<mech>`.

  python tests/multihost_check.py WORKDIR [experiments.run flags...]
"""

import sys

from experiments import run


def main(argv):
  workdir, flags = argv[0], argv[1:]
  for mech in ('none', 'ldp', 'dpsgd'):
    code = run.main([f'--mech={mech}', f'--workdir={workdir}/{mech}', *flags])
    if code:
      return code
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
