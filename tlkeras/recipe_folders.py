"""The photo folders the auto recipes are measured on (docs/recipes.md), written from data a
user already has: CIFAR-10 as class folders at 32x32 with renamed classes, and a copy of a
photo folder at another size.

    python -m tlkeras.recipe_folders OUT [--data-dir TFDS_DIR] [--photos FOLDER] [--short-side 96]

writes OUT/cifar_50 and OUT/cifar_1000 (train/<class>/ with 50 or 1,000 PNGs per class from
CIFAR-10's train split, test/<class>/ with 100 per class from its test split; the classes
renamed alpha..juliet, so nothing can lean on CIFAR's names) and, with --photos,
OUT/<name>_<short side> (every readable image resized so its short side is that many pixels,
JPEG quality 90, the same tree).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tlkeras.errors import ArgumentParser, UserError, run_cli

NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
PER_CLASS = (50, 1000)
TEST_PER_CLASS = 100


def write_cifar(out: Path, data_dir: str | None, per_class: tuple[int, ...] = PER_CLASS) -> list[Path]:
    """CIFAR-10 (tfds, read with download=data_dir is None) as PNG class folders; returns
    the folders written. The first `n` images of each class in the split's order."""
    import tensorflow_datasets as tfds
    from PIL import Image

    splits = {"train": max(per_class), "test": TEST_PER_CLASS}
    images: dict[str, list[list]] = {}
    for split, wanted in splits.items():
        ds = tfds.load("cifar10", split=split, data_dir=data_dir, download=data_dir is None)
        images[split] = [[] for _ in NAMES]
        for example in tfds.as_numpy(ds):
            kept = images[split][int(example["label"])]
            if len(kept) < wanted:
                kept.append(example["image"])
            if all(len(k) >= wanted for k in images[split]):
                break
    written = []
    for n in per_class:
        root = out / f"cifar_{n}"
        for split, wanted in (("train", n), ("test", TEST_PER_CLASS)):
            for name, kept in zip(NAMES, images[split]):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i, pixels in enumerate(kept[:wanted]):
                    Image.fromarray(pixels).save(folder / f"{split}_{i:04d}.png")
        written.append(root)
    return written


def write_resized(photos: Path, out: Path, short_side: int) -> Path:
    """A copy of `photos` with every readable image's short side `short_side` pixels
    (Lanczos, JPEG quality 90); files Pillow cannot read are left out."""
    from PIL import Image, UnidentifiedImageError

    root = out / f"{photos.name}_{short_side}"
    for path in sorted(photos.rglob("*")):
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError):
            continue
        scale = short_side / min(im.size)
        target = root / path.relative_to(photos).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        size = (round(im.size[0] * scale), round(im.size[1] * scale))
        im.resize(size, Image.Resampling.LANCZOS).save(target, quality=90)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tlkeras.recipe_folders", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the measurement folders into")
    parser.add_argument("--data-dir", help="a tfds data_dir holding cifar10 (default: download it)")
    parser.add_argument("--photos", type=Path, help="a photo folder to copy at --short-side")
    parser.add_argument("--short-side", type=int, default=96, help="pixels (default 96)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.photos is not None and not args.photos.is_dir():
            raise UserError(f"--photos '{args.photos}': no such folder; give a folder of class subfolders")
        if args.short_side < 8:
            raise UserError(f"--short-side {args.short_side}: too small; give at least 8 pixels")
        from tlkeras.console import quiet_libraries

        quiet_libraries(args.debug)
        for folder in write_cifar(args.out, args.data_dir):
            print(f"wrote {folder}")
        if args.photos is not None:
            print(f"wrote {write_resized(args.photos, args.out, args.short_side)}")

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
