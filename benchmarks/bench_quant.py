"""Quantize-kernel benchmark: `python benchmarks/bench_quant.py [options]` = `fp4train bench quant`.

See `fp4train bench --help`; results go to benchmarks/RESULTS.md with --results.
"""

import sys

from fp4train.bench import main

if __name__ == "__main__":
    sys.exit(main(["quant", *sys.argv[1:]]))
