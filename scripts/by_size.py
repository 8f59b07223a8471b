"""Where do runs lose? Per-image Dice (or IoU) grouped by the object's share of the image.

    python scripts/by_size.py checkpoint/<run_a> checkpoint/<run_b>           (final test evaluations)
    python scripts/by_size.py a.json b.json -groups 4 -metric iou             (val.py -json files)

The images of the evaluation are split into equal-count groups by the foreground fraction of their mask
(smallest objects first); the table gives each run's mean per group, overall, and how many images it scores
below 0.5. The masks are read from the dataset the first evaluation ran on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_cli  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from cfg import Config
    from common.tables import markdown_table
    from engine.breakdown import by_foreground, evaluated_config, foreground_fractions
    from engine.paired import read_per_image
    from engine.session import load_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", type=Path, nargs="+", help="run folders or val.py -json files")
    parser.add_argument("-groups", type=int, default=4, help="equal-count groups of images (default: quartiles)")
    parser.add_argument("-metric", choices=("dice", "iou"), default="dice")
    args = parser.parse_args(argv)
    runs = {str(path): read_per_image(path) for path in args.evaluations}
    config = Config.from_json(evaluated_config(args.evaluations[0]))
    data = load_data(config, verbose=False)
    dataset = data.test if data.test is not None else data.val
    result = by_foreground(runs, foreground_fractions(dataset), args.groups, args.metric)
    headers = ["run", *[f"{low:.3f}-{high:.3f} ({n})" for (low, high), n in zip(result["ranges"], result["sizes"])],
               "all", "below 0.5"]
    print(f"mean {args.metric} by foreground fraction of the image (images per group in brackets):\n")
    print(markdown_table(headers, ([label, *[f"{m:.3f}" for m in means], f"{result['overall'][label]:.4f}",
                                    str(result["below_half"][label])] for label, means in result["means"].items())))
    return result


if __name__ == "__main__":
    run_cli(main)
