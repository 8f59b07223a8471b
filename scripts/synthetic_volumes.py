"""Write small synthetic CT-like volumes with label volumes (NIfTI), for tests and the -dataset nifti demo.

    python scripts/synthetic_volumes.py -out data/synth_ct -count 6

Each case: DATA/imagesTr/caseNN.nii.gz (int16, Hounsfield-like: air -1000 around a soft-tissue body of
about 40 HU with noise, two "organs" of 80 and 150 HU) and DATA/labelsTr/caseNN.nii.gz (uint8: 1 and 2
where the organs are), plus DATA/dataset.json naming the labels. The affine is anisotropic and not
RAS-aligned (axes flipped), so readers must reorient.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_case(shape=(40, 48, 10), seed: int = 0, empty_slices: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(image int16, labels uint8) of `shape`; the first and last `empty_slices` axial slices hold no label."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    image = np.full(shape, -1000.0)
    image[ellipsoid(shape, (x / 2, y / 2, z / 2), (x * 0.45, y * 0.45, z * 10))] = 40.0
    labels = np.zeros(shape, np.uint8)
    inner = slice(empty_slices, z - empty_slices)
    for value, hu, offset in ((1, 80.0, -0.18), (2, 150.0, 0.18)):
        centre = (x / 2 + offset * x + rng.uniform(-2, 2), y / 2 + rng.uniform(-3, 3), z / 2)
        organ = ellipsoid(shape, centre, (x * 0.14, y * 0.2, z))
        organ[..., :inner.start] = False
        organ[..., inner.stop:] = False
        labels[organ] = value
        image[organ] = hu
    image += rng.normal(0, 10, shape)
    return np.rint(image).astype(np.int16), labels


def write_volumes(root: Path, count: int = 4, shape=(40, 48, 10), seed: int = 0, affine: np.ndarray = AFFINE,
                  names: dict | None = None) -> Path:
    import nibabel as nib

    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, labels = make_case(shape, seed + i)
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"case{i:02d}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(root / "labelsTr" / f"case{i:02d}.nii.gz"))
    labels_json = names if names is not None else {"0": "background", "1": "liver", "2": "kidney"}
    (root / "dataset.json").write_text(json.dumps({"name": "synthetic CT", "labels": labels_json}, indent=2))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-out", required=True)
    parser.add_argument("-count", type=int, default=6)
    parser.add_argument("-seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {args.count} cases to {write_volumes(Path(args.out), args.count, seed=args.seed)}")


if __name__ == "__main__":
    main()
