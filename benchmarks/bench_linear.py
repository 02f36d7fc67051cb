"""FP4Linear benchmark: `python benchmarks/bench_linear.py [options]` = `fp4train bench linear`.

See `fp4train bench --help`; results go to benchmarks/RESULTS.md with --results.
"""

import sys

from fp4train.bench import main

if __name__ == "__main__":
    sys.exit(main(["linear", *sys.argv[1:]]))
