"""Augmentation benchmark (fusedtrain.augment.BatchAugment vs torchvision v2 per sample and per batch).

Same as ``python -m fusedtrain.bench --family augment``; all options of that command apply, e.g.
``python benchmarks/bench_augment.py --device cpu --reps 20 --json out.json`` or ``--batch 128``.
"""

import sys

from fusedtrain.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--family", "augment", *sys.argv[1:]]))
