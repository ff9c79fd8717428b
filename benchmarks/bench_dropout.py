"""Dropout-family benchmark (fusedtrain vs torch, interleaved, one run).

Same as ``python -m fusedtrain.bench --family dropout``; all options of that command apply, e.g.
``python benchmarks/bench_dropout.py --device cpu --reps 15 --json out.json``. CPU: 2^24 float32 elements;
CUDA: 2^27 elements in float32 and bfloat16 (CUDA events). Rows: dropout forward, forward+backward with the
bytes each implementation keeps for backward, bias-dropout-add forward+backward, L1+L2 penalty.
"""

import sys

from fusedtrain.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--family", "dropout", *sys.argv[1:]]))
