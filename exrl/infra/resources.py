"""Host resources a run reports about itself."""
from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
  """This process's peak resident set size so far, in MiB (getrusage: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
