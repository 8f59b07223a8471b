"""Is run A better than run B on the same test images? Per-image paired difference with a bootstrap interval.

    python scripts/paired.py checkpoint/<run_a> checkpoint/<run_b>            (final test evaluations)
    python scripts/paired.py a.json b.json -metric iou                       (val.py -json files)

Prints the mean Dice (or IoU) of each, their mean per-image difference A - B with a 95% bootstrap interval
over images, and on how many images each is ahead. An interval that contains 0 means the test images
cannot tell the two apart.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_cli  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from engine.paired import paired_difference, read_per_image

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="run folder or val.py -json file")
    parser.add_argument("b", type=Path, help="run folder or val.py -json file")
    parser.add_argument("-metric", choices=("dice", "iou"), default="dice")
    parser.add_argument("-resamples", type=int, default=10000, help="bootstrap resamples of the images")
    args = parser.parse_args(argv)
    result = paired_difference(read_per_image(args.a), read_per_image(args.b), args.metric, args.resamples)
    print(f"{result['images']} images, mean {args.metric}: A {result['mean_a']:.4f}, B {result['mean_b']:.4f}; "
          f"A - B {result['difference']:+.4f} (95% bootstrap interval {result['ci_low']:+.4f} to "
          f"{result['ci_high']:+.4f}); A ahead on {result['a_better']} images, B on {result['b_better']}")
    return result


if __name__ == "__main__":
    run_cli(main)
