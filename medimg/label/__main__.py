"""``python -m medimg.label serve ...`` (see :mod:`medimg.label.serve`)."""

from __future__ import annotations

import sys

from medimg.label.serve import main

if __name__ == "__main__":
    sys.exit(main())
