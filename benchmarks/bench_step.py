"""Training-step benchmark: `python benchmarks/bench_step.py [options]` = `fp4train bench step`.

See `fp4train bench --help`; results go to benchmarks/RESULTS.md with --results.
"""

import sys

from fp4train.bench import main

if __name__ == "__main__":
    sys.exit(main(["step", *sys.argv[1:]]))
