"""Silencing absl's INFO/WARNING chatter around calls into libraries that log through it.

dp-accounting warns once per RDP order it drops and TFDS narrates every build; neither is
actionable for a dpjax user, and both bury the one-line errors dpjax prints.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def errors_only() -> Iterator[None]:
  """Raises absl's logger to ERROR for the block and restores its level afterwards."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)
