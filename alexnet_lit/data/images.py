"""One image file: is it hidden, is it an image, can it be read, and how it becomes RGB or L.

The one source of truth for "what is a usable image", shared by the DataModule and the data
doctor (``scripts/check_data.py``).
"""

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from alexnet_lit.errors import first_line

# Entries that operating systems and tools drop into datasets; never classes, never samples.
# Any name starting with a dot (.DS_Store, .ipynb_checkpoints, ._photo.jpg) is hidden too.
SYSTEM_NAMES = {
    "__MACOSX",
    "Thumbs.db",
    "desktop.ini",
    "@eaDir",
    "$RECYCLE.BIN",
    "System Volume Information",
    "lost+found",
}
# Formats Pillow may open. Limiting the list keeps Pillow's weaker detectors (TGA, XBM, ...)
# from taking a text file for an image.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Leading bytes of those formats, to tell "not an image" from "an image with a broken header".
SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
# ISO base media files start with an ftyp box (size, b"ftyp", major brand, minor version,
# compatible brands); these brands mark HEIC, the format iPhones save photos in.
HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
# Image formats a user may have that Pillow cannot open: such a file is an unreadable image,
# reported with what to do, not a file that is ignored as "not an image".
UNSUPPORTED = {"HEIC": "HEIC is not supported; convert it to JPEG or PNG"}
# Names that make a file an image whatever it holds: torchvision's, plus the formats Pillow
# reads here (GIF) or cannot read (HEIC), so that a broken or unsupported one is reported.
# torchvision's IMG_EXTENSIONS (tests/test_data_doctor.py checks they agree), spelled out so
# that the scan needs no torch.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif", ".heic", ".heif")
HEAD_BYTES = 64
# The end markers a complete file carries within its last bytes; a file without one is checked
# by a full decode (some cameras append data after the JPEG end marker).
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
TAIL_BYTES = 4096
# Transparent pixels are composited on white, as a browser shows them (never on black).
BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION = 0x0112


READ_ERROR = "cannot read the file"  # the reason probe gives for an OSError


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is a hidden or system entry (``.DS_Store``, ``__MACOSX``)."""
    return name.startswith(".") or name in SYSTEM_NAMES


def has_image_extension(path: str | Path) -> bool:
    """Whether a file is named like an image (``IMAGE_EXTENSIONS``), whatever it holds."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes (up to ``HEAD_BYTES``), or None; it may
    be one that cannot be read (``UNSUPPORTED``)."""
    for signature, name in SIGNATURES.items():
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PPM"
    if head[4:8] == b"ftyp":
        end = min(int.from_bytes(head[:4], "big"), len(head))
        brands = [head[8:12], *(head[i : i + 4] for i in range(16, end - 3, 4))]
        if HEIC_BRANDS.intersection(brands):
            return "HEIC"
    return None


@dataclass(frozen=True)
class ImageInfo:
    """What a header says about a readable image."""

    format: str
    mode: str
    width: int
    height: int


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`probe`: ``info`` for a usable image, else ``problem`` and ``reason``.

    ``problem`` is ``"unreadable"`` (an image that cannot be used: excluded and reported) or
    ``"not_image"`` (some other file: ignored and counted).
    """

    info: ImageInfo | None = None
    problem: str | None = None
    reason: str = ""


def probe(path: str | Path, data: bytes | None = None) -> Verdict:
    """Cheap checks of one file: size, signature, header, pixel count and a truncation check.

    Reads the header, not the pixels (a full decode only confirms a file whose end marker is
    missing). ``data`` is the file's bytes when the caller has read them already.
    """
    path = Path(path)
    with warnings.catch_warnings():
        # A header over the pixel limit is reported below, not warned about.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if data is None:
                with open(path, "rb") as file:
                    return _probe_file(path, file)
            return _probe_file(path, io.BytesIO(data))
        except OSError as err:
            return Verdict(problem="unreadable", reason=f"{READ_ERROR} ({err.strerror})")


def _probe_file(path: Path, file: BinaryIO) -> Verdict:
    head = file.read(HEAD_BYTES)
    image_like = has_image_extension(path)
    if not head:
        return Verdict(problem="unreadable" if image_like else "not_image", reason="empty file")
    sniffed = sniff_format(head)
    if sniffed is None:
        return Verdict(
            problem="unreadable" if image_like else "not_image",
            reason=f"not an image: its content is no known image format (starts with {head[:8]!r})",
        )
    if sniffed in UNSUPPORTED:
        return Verdict(problem="unreadable", reason=UNSUPPORTED[sniffed])
    file.seek(0)
    Image.init()  # registers every plugin (MPO, WEBP, TIFF); a no-op after the first call
    try:
        image = Image.open(file, formats=FORMATS)
    except Image.DecompressionBombError as err:
        return Verdict(problem="unreadable", reason=_bomb_reason(str(err)))
    except Exception as err:  # Pillow raises many types for a broken header
        reason = f"corrupt {sniffed} header ({_first_line(err)})"
        return Verdict(problem="unreadable", reason=reason)
    with image:
        width, height = image.size
        info = ImageInfo(image.format, image.mode, width, height)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:
            return Verdict(
                problem="unreadable",
                reason=f"{width}x{height} pixels is over Pillow's decompression-bomb limit "
                f"({limit} pixels)",
            )
        if width < 1 or height < 1:
            return Verdict(problem="unreadable", reason=f"corrupt header: size {width}x{height}")
        marker = END_MARKERS.get(image.format)
        if marker is not None:
            size = file.seek(0, 2)
            file.seek(max(0, size - TAIL_BYTES))
            if marker not in file.read():
                try:
                    image.load()
                except Exception as err:
                    return Verdict(problem="unreadable", reason=f"truncated ({_first_line(err)})")
    return Verdict(info=info)


def _bomb_reason(message: str) -> str:
    return f"over Pillow's decompression-bomb limit ({_first_line(message)})"


def _first_line(err: object) -> str:
    return first_line(err) or type(err).__name__


def open_image(path: str | Path) -> Image.Image:
    """Open an image file lazily: the header is read, the pixels only by ``load()``."""
    return Image.open(path)


def shown_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened image as shown, after its EXIF orientation."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def load_image(path: str | Path, in_channels: int = 3) -> Image.Image:
    """Open an image as the RGB (or, for ``in_channels=1``, grayscale) picture a user expects
    (:func:`to_rgb_or_l`). Raises whatever Pillow raises for a broken file."""
    with open_image(path) as image:
        image.load()
        return to_rgb_or_l(image, in_channels)


def to_rgb_or_l(image: Image.Image, in_channels: int = 3) -> Image.Image:
    """A loaded image as a new RGB (or, for ``in_channels=1``, grayscale) picture.

    EXIF orientation is applied; palette, RGBA and LA images are composited on a white
    background; CMYK is converted to RGB; 16- and 32-bit grayscale is scaled to 8 bits (not
    clipped).
    """
    image = ImageOps.exif_transpose(image)  # a new image, rotated as shown
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    mode = "L" if in_channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


def to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) images to ``L``.

    Pillow's own conversion clips these to 0..255, which turns most 16-bit images white.
    ``I;16`` and ``I`` are read as 16-bit values (0..65535, what PNG and TIFF hold); ``F`` is
    taken as 0..1 when its values lie there, else as 0..255.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    pixels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if pixels.size and pixels.min() >= 0.0 and pixels.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8))
