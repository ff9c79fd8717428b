"""Optimizer-step benchmark (fusedtrain vs torch for-loop / foreach / fused).

Same as ``python -m fusedtrain.bench --family optim``; all options of that command apply, e.g.
``python benchmarks/bench_optim.py --device cpu --sizes large-98 --json out.json``.
"""

import sys

from fusedtrain.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--family", "optim", *sys.argv[1:]]))
