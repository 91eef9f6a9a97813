"""Compare two TRPrompt run directories artifact by artifact (e.g. two runs with the same seed).

    python scripts/compare_runs.py runs/a runs/b

Prints one line per artifact (``same`` / ``DIFFERS`` with the first difference) and exits
1 when anything differs. Wall times, process ids and paths are ignored; adapter weights
are compared byte by byte, tables row by row (see ``trprompt.run_dir.compare_runs``).
"""

from __future__ import annotations

import argparse
import sys

from trprompt.run_dir import compare_runs


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="first run directory")
    p.add_argument("b", help="second run directory")
    args = p.parse_args(argv)
    cmp = compare_runs(args.a, args.b)
    print("\n".join(cmp.lines()))
    return 0 if cmp.same else 1


if __name__ == "__main__":
    sys.exit(main())
