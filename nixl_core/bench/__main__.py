"""``python -m nixl_core.bench`` = ``nixl-bench``."""

import sys

from nixl_core.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
