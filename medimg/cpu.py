"""CPU threading default of the command-line tools, applied on import, before PyTorch loads.

PyTorch's OpenMP threads spin-wait for work (GNU OpenMP: 300,000 spins by default). On a machine
whose cores another job is using, the spinning threads steal each other's time: the test suite's
tiny ``medsam3d`` training took 573 s beside one CPU-heavy job on 2 cores, against 44 s alone. A
spin of 10,000 took 102 s beside the same job and 45 s alone. The CLIs set it unless the user has
set ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``; importing medimg as a library changes nothing.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
