"""Write a figure of 8 augmented training samples with their masks and prompts.

    python scripts/show_samples.py -dataset synthetic            -> figs/samples_synthetic.png
    python scripts/show_samples.py -dataset refuge -data_path DIR -prompt box -aug strong -roi_crop
Takes train.py's flags.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_cli  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> Path:
    import torch

    from cfg import parse_args
    from datasets import DataOptions, build_datasets
    from engine.overlays import save_overlay_grid

    config, _ = parse_args("train", argv)
    torch.manual_seed(config.seed)
    data = build_datasets(DataOptions.pick(config))
    print(f"dataset {config.dataset}: {data.layout}; classes {', '.join(data.class_names)}")
    count = min(8, len(data.train))
    picks = torch.linspace(0, len(data.train) - 1, count).round().long().tolist()
    samples = [data.train[i] for i in picks]
    path = Path(config.figs_root) / f"samples_{config.dataset}.png"
    save_overlay_grid(samples, path, title=f"{config.dataset}: training samples (aug {config.aug}, prompt "
                                          f"{config.prompt}, S={config.image_size})")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
