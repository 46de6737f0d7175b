"""A dirty ImageFolder for the data tests: every case the pipeline must survive, made here."""

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["ant", "bee", "cat"]


@dataclass
class DirtyDataset:
    root: Path
    healthy: dict[str, list[Path]] = field(default_factory=dict)  # split -> usable images
    unreadable: dict[Path, str] = field(default_factory=dict)  # found by the scan -> reason word
    load_fails: list[Path] = field(default_factory=list)  # pass the scan, fail to decode
    not_images: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)


def noise_image(rng: np.random.Generator, size=(40, 30), tint: int = 0) -> Image.Image:
    width, height = size
    pixels = rng.integers(0, 90, size=(height, width, 3))
    pixels[..., tint % 3] += 150
    return Image.fromarray(pixels.astype(np.uint8))


def png_with_size(path: Path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims width x height (a decompression bomb by its header)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def png_with_corrupt_pixels(path: Path, rng: np.random.Generator) -> None:
    """A PNG with a valid header and end marker whose compressed pixel data is garbage."""
    noise_image(rng, (32, 32)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = rng.integers(0, 256, 50, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def mode_images(folder: Path) -> list[Path]:
    """One image per mode the loader converts: L, P with transparency, RGBA, LA, CMYK, I;16,
    EXIF-rotated, 1-bit and one smaller than any crop."""
    paths = {
        "gray.png": Image.new("L", (30, 20), 90),
        "rgba.png": Image.new("RGBA", (30, 20), (255, 0, 0, 0)),
        "la.png": Image.new("LA", (30, 20), (0, 0)),
        "cmyk.jpg": Image.new("CMYK", (30, 20), (0, 255, 255, 0)),
        "sixteen.png": Image.fromarray(np.full((20, 30), 30000, dtype=np.uint16)),
        "bits.png": Image.new("1", (30, 20), 1),
        "tiny.png": Image.new("RGB", (5, 3), (0, 0, 255)),
    }
    palette = Image.new("P", (30, 20), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    paths["palette.png"] = palette
    written = []
    for name, image in paths.items():
        image.save(folder / name, **({"transparency": 0} if name == "palette.png" else {}))
        written.append(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (0, 200, 0)).save(folder / "rotated.jpg", exif=exif)
    written.append(folder / "rotated.jpg")
    return written


def make_dirty_folder(root: Path, with_val: bool = True, seed: int = 0) -> DirtyDataset:
    """train/ (and val/) with hidden entries, non-images, broken and odd-mode images."""
    rng = np.random.default_rng(seed)
    ds = DirtyDataset(root, healthy={"train": [], "val": []})
    splits = {"train": 4, "val": 2} if with_val else {"train": 6}
    for split, per_class in splits.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise_image(rng, tint=label).save(folder / f"img_{i}.jpg")
                ds.healthy[split].append(folder / f"img_{i}.jpg")
    train = root / "train"
    ds.healthy["train"] += mode_images(train / "bee")
    # An image without an extension is an image by content.
    noise_image(rng, tint=2).save(train / "cat" / "no_extension", format="JPEG")
    ds.healthy["train"].append(train / "cat" / "no_extension")
    # Hidden and system entries: never classes, never samples.
    for hidden_dir in (train / ".ipynb_checkpoints", train / "__MACOSX", train / "ant" / ".cache"):
        hidden_dir.mkdir()
        noise_image(rng).save(hidden_dir / "img_0.jpg")
        ds.hidden.append(hidden_dir)
    hidden_files = (train / ".DS_Store", train / "bee" / "Thumbs.db", train / "ant" / "._a.jpg")
    for hidden_file in hidden_files:
        hidden_file.write_bytes(b"\x00\x05\x16\x07 not an image")
        ds.hidden.append(hidden_file)
    # Not images, by content: ignored and counted.
    (train / "cat" / "notes.txt").write_text("collected on a rainy day\n")
    (train / "ant" / "labels.json").write_text('{"ant": 0}\n')
    ds.not_images += [train / "cat" / "notes.txt", train / "ant" / "labels.json"]
    # Unreadable images that the cheap checks find before training.
    cat = train / "cat"
    (cat / "empty.jpg").write_bytes(b"")
    ds.unreadable[cat / "empty.jpg"] = "empty"
    noise_image(rng, (64, 64)).save(cat / "truncated.jpg")
    data = (cat / "truncated.jpg").read_bytes()
    (cat / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    ds.unreadable[cat / "truncated.jpg"] = "truncated"
    (cat / "bad_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
    ds.unreadable[cat / "bad_header.png"] = "corrupt PNG header"
    png_with_size(cat / "bomb.png", 12_000, 12_000)
    ds.unreadable[cat / "bomb.png"] = "decompression-bomb"
    (cat / "saved_page.jpg").write_text("<!DOCTYPE html><html>404 not found</html>")
    ds.unreadable[cat / "saved_page.jpg"] = "not an image"
    # Passes the header checks, fails to decode: skipped at load time.
    png_with_corrupt_pixels(cat / "corrupt_pixels.png", rng)
    ds.load_fails.append(cat / "corrupt_pixels.png")
    return ds
