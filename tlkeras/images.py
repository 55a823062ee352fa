"""Decode every image a person sends, and fit it to the model's square input.

    from tlkeras.images import decode_file, fit_square
    pixels = decode_file("cat.jpg")          # uint8 RGB [H, W, 3], EXIF orientation applied
    square = fit_square(pixels, 32)          # uint8 [32, 32, 3], centre-cropped, resized

Two decoders, one pixel convention:
- `decode_bytes` / `decode_file` (Pillow, in Python): what training on folders and the
  predict CLI use. JPEG, PNG, BMP, GIF (first frame), HEIC/HEIF (pillow-heif) and AVIF
  (Pillow), recognised by their first bytes whatever the file is called; EXIF orientation
  applied (`PIL.ImageOps.exif_transpose`; TensorFlow ignores it: tensorflow/tensorflow#33932,
  phone photos come out sideways); an embedded ICC colour profile (Adobe RGB, Display P3)
  converted to sRGB (`PIL.ImageCms`), as a colour-managed viewer shows it; transparency
  composited onto white; every failure is one ImageError line naming the file.
- `decode_in_graph` (TF ops): the SavedModel's `predict_bytes` signature, where no Python
  runs. JPEG, PNG, BMP and GIF only; same checks and the same white compositing as far as
  TF's decoders allow (its docstring lists what they cannot do: HEIC/AVIF, ICC profiles,
  EXIF orientation; `upright_bytes` prepares any file for it on the client).
Both end in `fit_square`, so training, predict and serving see the same pixels.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageCms,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    features,
)

from tlkeras.errors import UserError

if TYPE_CHECKING:  # TensorFlow is imported inside the functions: nothing heavy at import
    import tensorflow as tf

FORMATS = ("JPEG", "PNG", "BMP", "GIF", "HEIF", "AVIF")  # what decode_bytes reads
GRAPH_FORMATS = ("JPEG", "PNG", "BMP", "GIF")  # what decode_in_graph (predict_bytes) reads
# The one list of file name endings tlkeras takes for images (the folder scan and predict's
# help read it). The name is only a first guess: a file with another or no extension is
# still read when its first bytes are one of FORMATS (sniff_file), and a .jpg that holds a
# HEIC photo is decoded as HEIC.
EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif", ".jif", ".jfi"),
    "PNG": (".png",),
    "BMP": (".bmp", ".dib"),
    "GIF": (".gif",),
    "HEIF": (".heic", ".heif", ".hif", ".heics", ".heifs"),
    "AVIF": (".avif", ".avifs"),
}
IMAGE_EXTENSIONS = tuple(ext for exts in EXTENSIONS.values() for ext in exts)
DECODE_VERSION = 3  # bump when decode_file's output changes, so prepared folders are redone
MAX_IMAGE_BYTES = 16 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096  # refuse before decoding: a 30k x 30k PNG is 2.7 GB of RAM
# Files read on the user's own machine (training folders, `predict`) may be larger: a
# 48-megapixel phone photo is an ordinary input there. Still far below a decompression bomb.
FILE_LIMITS = {"max_bytes": 64 * 2**20, "max_pixels": 10_000 * 10_000}
# Transparent pixels become this colour (RGB). White, not the stored colour: PNG and GIF
# editors often leave black or arbitrary values under alpha 0, which a model would see.
BACKGROUND = (255, 255, 255)

FORMAT_NAMES = "JPEG, PNG, BMP, GIF, HEIC/HEIF and AVIF"  # FORMATS in words, for messages and help
_READS = f"tlkeras reads {FORMAT_NAMES}"
_ONE_OF = FORMAT_NAMES.replace(" and ", " or ")
_GRAPH_ONE_OF = f"{', '.join(GRAPH_FORMATS[:-1])} or {GRAPH_FORMATS[-1]}"
_MIB = f"{MAX_IMAGE_BYTES // 2**20} MiB"
_SIDE = math.isqrt(MAX_IMAGE_PIXELS)
_MAGIC = {  # first bytes of each readable format
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
}
# The plugin classes, not Image.open: Image.open would raise its own decompression-bomb
# error (at 179 M pixels) before our lower limit can name the image's size.
_OPENERS = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
}
# Phone formats (ISO-BMFF): b"ftyp" at bytes 4..8, then the major brand. 'mif1'/'msf1' are
# generic: the compatible brands of the ftyp box say whether the file is AVIF.
_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2")
_SNIFF_BYTES = 64  # enough for every check of sniff_format


def shown(path: str | bytes | os.PathLike) -> str:
    """A file name as messages and logs show it: always printable UTF-8.

    Bytes that are not UTF-8 (a zip made on Windows: Latin-1 'café' is b'caf\\xe9') come
    back from the OS as surrogates, which print() and log files refuse with a traceback;
    here they are backslash escapes ('caf\\xe9.jpg'), as are control characters."""
    text = os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ImageError(UserError):
    """An image file tlkeras cannot use; the message is one line naming the file and the fix."""


def sniff_format(data: bytes) -> str | None:
    """One of FORMATS from the first bytes (magic numbers, ISO-BMFF brands), else None."""
    for fmt, magics in _MAGIC.items():
        if data.startswith(magics):
            return fmt
    if data[4:8] == b"ftyp":
        box = int.from_bytes(data[:4], "big")
        brands = [data[8:12]] + [data[i : i + 4] for i in range(16, min(box, len(data)) - 3, 4)]
        if brands[0] in _AVIF_BRANDS or (brands[0] in (b"mif1", b"msf1") and set(brands) & set(_AVIF_BRANDS)):
            return "AVIF"
        if brands[0] in _HEIF_BRANDS:
            return "HEIF"
    return None


def sniff_file(path: str | bytes | os.PathLike) -> str | None:
    """sniff_format on a file's first bytes; None when it cannot be read either."""
    try:
        with open(path, "rb") as f:
            return sniff_format(f.read(_SNIFF_BYTES))
    except OSError:
        return None


def _describe_other(data: bytes) -> str:
    """What a file that is none of FORMATS is, in words: 'is a WEBP image', 'is a text file'."""
    if _looks_like_text(data):
        return "is a text file, not an image"
    # Pillow knows ~40 formats. Identification only: nothing is decoded, and any failure
    # (a decompression-bomb error or warning included) just means "unknown".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return f"is a {im.format} image"
        except Exception:  # noqa: BLE001
            return "is not an image tlkeras recognises"


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # invalid in the middle, not a character cut at the end
            return False
        text = head[: e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _too_big(name: str, size: int, limit: int = MAX_IMAGE_BYTES) -> ImageError:
    mib = f"{limit // 2**20} MiB"
    return ImageError(
        f"'{name}': file is {size / 2**20:.1f} MiB, over the {mib} limit; downscale or re-encode it below {mib}"
    )


def decode_bytes(
    data: bytes,
    name: str = "image",
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft: int | None = None,
) -> np.ndarray:
    """An encoded image file (one of FORMATS) -> uint8 RGB pixels [H, W, 3], upright, sRGB, opaque.

    Checks, in order (each an ImageError `'<name>': <reason>; <fix>` on one line): empty;
    over `max_bytes`; not one of FORMATS by its magic bytes (names what it is: WEBP,
    TIFF, HEIC, text...); unreadable header; over `max_pixels` by the header's size,
    before any pixel is decoded; truncated or corrupt pixel data. Pillow's exceptions
    never escape.
    Then: GIF -> first frame; EXIF orientation applied (`ImageOps.exif_transpose`; phone
    photos are stored sideways with an orientation tag, tensorflow/tensorflow#33932);
    alpha of any kind (RGBA, LA, PA, palette or single-colour tRNS transparency) composited
    onto BACKGROUND; CMYK, palette, grayscale and 16-bit -> 8-bit RGB. 16-bit samples keep
    their high byte, as TF's PNG decoder does, so both decoders agree.
    `draft` (JPEG only): decode at the smallest DCT scale (1/2, 1/4 or 1/8, libjpeg's
    scaling through Pillow's Image.draft) that keeps both sides at least `draft` pixels;
    a 4032x3024 photo bound for 224 px is decoded 8x smaller, several times faster.
    """
    if not data:
        raise ImageError(f"'{name}': empty file (0 bytes); pass a {_ONE_OF} image")
    if len(data) > max_bytes:
        raise _too_big(name, len(data), max_bytes)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(f"'{name}': {_describe_other(data)}; {_READS}: convert it")
    opener = _opener(fmt, name)
    # Pillow's parsers raise nearly any built-in exception on malformed input (SyntaxError,
    # struct.error, IndexError, UnicodeDecodeError, ValueError, OSError...); each try block
    # holds one Pillow call, so a failure there is always the file's fault.
    try:
        im = opener(io.BytesIO(data))
    except Exception:  # noqa: BLE001
        raise ImageError(
            f"'{name}': corrupt or truncated {fmt} header; re-save the image or pass another file"
        ) from None
    width, height = im.size
    if width * height > max_pixels:
        side = math.isqrt(max_pixels)
        raise ImageError(
            f"'{name}': {width}x{height} image ({width * height} pixels) is over the "
            f"{side}x{side} limit ({max_pixels} pixels); downscale it"
        )
    if draft is not None and fmt == "JPEG":
        try:
            im.draft(im.mode, (draft, draft))  # before load(); a square request is rotation-proof
        except Exception:  # noqa: BLE001 - no scaling: decoded in full, as without draft
            pass
    try:
        im.load()  # for GIF: the first frame, where the file is positioned after opening
    except Exception:  # noqa: BLE001
        raise ImageError(
            f"'{name}': truncated or corrupt {fmt} image data; re-save the image or pass another file"
        ) from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - broken EXIF: show it as stored, as browsers do
        pass
    return _to_rgb(to_srgb(im))


def _opener(fmt: str, name: str):
    """The Pillow image class that reads `fmt`; HEIF and AVIF come from their plugins."""
    if fmt == "HEIF":
        try:
            from pillow_heif import HeifImageFile
        except ImportError:
            raise ImageError(
                f"'{name}': is a HEIC/HEIF image and pillow-heif is not installed; pip install pillow-heif"
            ) from None
        return HeifImageFile
    if fmt == "AVIF":
        if not features.check("avif"):
            raise ImageError(
                f"'{name}': is an AVIF image and this Pillow was built without AVIF; pip install -U pillow"
            )
        from PIL import AvifImagePlugin

        return AvifImagePlugin.AvifImageFile
    return _OPENERS[fmt]


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def embedded_profile(im: Image.Image) -> ImageCms.ImageCmsProfile | None:
    """The image's ICC profile when it is one to convert: present, readable and not sRGB
    by its description (sRGB is what tlkeras and a viewer assume; converting it would only
    cost time). None otherwise."""
    icc = im.info.get("icc_profile")
    if not icc:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if ImageCms.getProfileDescription(profile).strip().startswith("sRGB"):
            return None
    except Exception:  # noqa: BLE001 - a damaged profile: the pixels as stored, as browsers do
        return None
    return profile


def to_srgb(im: Image.Image) -> Image.Image:
    """`im` with its embedded ICC profile (Adobe RGB, Display P3, a camera's or a CMYK
    profile) converted to sRGB by LittleCMS (`PIL.ImageCms`), what a colour-managed viewer
    shows; alpha is kept. Unchanged: no profile, an sRGB one, a damaged one or one that does
    not fit the pixels (shown as stored, as browsers do), and 16-bit grayscale."""
    profile = embedded_profile(im)
    if profile is None or im.mode not in ("RGB", "RGBA", "L", "LA", "CMYK", "P", "PA"):
        return im
    try:
        work, alpha = im, None
        if work.mode in ("P", "PA") or work.info.get("transparency") is not None:
            work = work.convert("LA" if work.mode == "L" else "RGBA")
        if work.mode in ("RGBA", "LA"):
            alpha, work = work.getchannel("A"), work.convert(work.mode[:-1])
        out = ImageCms.profileToProfile(work, profile, _srgb(), outputMode="RGB")
    except Exception:  # noqa: BLE001 - a profile that does not fit the pixels
        return im
    out.info = {}  # plain sRGB pixels: no profile, no transparency key left to apply twice
    if alpha is not None:
        out.putalpha(alpha)
    return out


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode of FORMATS -> uint8 [H, W, 3], alpha over BACKGROUND."""
    transparency = im.info.get("transparency")
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling: keep the high
        # byte of each 16-bit sample, as libpng's strip_16 in TF's decoder does.
        wide = np.asarray(im).astype(np.int64)
        gray = np.clip(wide >> 8, 0, 255).astype(np.uint8)
        rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
        if isinstance(transparency, int):
            rgba[wide == transparency, 3] = 0
        return composite_over_background(rgba)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparency is not None:
        return composite_over_background(np.asarray(im.convert("RGBA")))
    return np.asarray(im.convert("RGB"))


def composite_over_background(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] -> uint8 [H, W, 3]: alpha-blend onto BACKGROUND.

    round((rgb * a + bg * (255 - a)) / 255) in float32: exact integers until the single
    division, so `decode_in_graph`'s TF version of this line gives identical bytes.
    """
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:].astype(np.float32)
    background = np.asarray(BACKGROUND, np.float32)
    return np.round((rgb * alpha + background * (255 - alpha)) / 255).astype(np.uint8)


def decode_file(
    path: str | bytes | os.PathLike,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft: int | None = None,
) -> np.ndarray:
    """decode_bytes on a file's contents: uint8 RGB [H, W, 3], as a viewer shows the file.

    The one decode of a file that training on folders, the folder scan and predict share.
    `path` may be bytes (os.fsencode, e.g. from a tf.string), so names that are not UTF-8
    are read too. The size is checked with stat() before anything is read, and the read is
    bounded, so a huge file (or a device such as /dev/zero) is refused without loading it.
    Raises ImageError naming the path (escaped by `shown`): missing/unreadable (with the OS
    reason), too big, or any decode_bytes failure. `draft`: as decode_bytes'.
    """
    path = Path(os.fsdecode(path))
    name = shown(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_big(name, size, max_bytes)
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)  # +1: a file that grew is still caught
    except OSError as e:
        raise ImageError(f"'{name}': cannot read it ({e.strerror}); check the path") from None
    return decode_bytes(data, name, max_bytes, max_pixels, draft)


def upright_bytes(data: bytes, name: str = "image") -> bytes:
    """An encoded image for the SavedModel's predict_bytes: `data` itself, or a PNG of
    decode_bytes' pixels when the graph would see something else: an EXIF orientation tag
    asking for a rotation or a flip, an ICC profile that is not sRGB, or a HEIC/HEIF or
    AVIF file (which the graph cannot decode at all).

    PNG is lossless, so the server then sees decode_bytes' pixels (alpha already on
    BACKGROUND); JPEG quality 95 only if the PNG would pass MAX_IMAGE_BYTES. Bytes that are
    no readable image are returned unchanged: the server refuses them with its own reason.
    Raises ImageError (from decode_bytes) only for an image to convert that cannot be decoded.
    """
    fmt = sniff_format(data)
    if fmt is None:
        return data
    if fmt in GRAPH_FORMATS:
        try:
            with _OPENERS[fmt](io.BytesIO(data)) as im:
                if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:  # getexif() may decode a PNG
                    return data
                orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
                managed = embedded_profile(im) is not None
        except Exception:  # noqa: BLE001 - unreadable: the server gives the reason
            return data
        if orientation in (None, 1) and not managed:
            return data
    upright = Image.fromarray(decode_bytes(data, name))
    out = io.BytesIO()
    upright.save(out, "PNG")
    if out.tell() > MAX_IMAGE_BYTES:
        out = io.BytesIO()
        upright.save(out, "JPEG", quality=95)
    return out.getvalue()


def fit_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [H, W, 3] (H, W may be dynamic) -> uint8 [size, size, 3], TF ops only.

    Centre-crops the largest centred square (aspect ratio kept, nothing stretched), then
    resizes bilinearly with antialiasing (a downscale averages, not skips, pixels), rounds
    and clips. Bit-exact identity when the image already is size x size. Usable eagerly,
    in a tf.data map and inside a tf.function/SavedModel; the one resize training on
    folders, predict and the SavedModel's bytes signature share.
    Raises TypeError when image is not uint8.
    """
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise TypeError(f"fit_square takes uint8 pixels, got {image.dtype.name}; decode with decode_bytes")
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.minimum(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side]
    resized = tf.image.resize(square, (size, size), method="bilinear", antialias=True)
    out = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return tf.ensure_shape(out, (size, size, 3))


# The shortest complete file of each format; anything shorter is truncated, and the header
# fields decode_in_graph reads lie inside it. JPEG: SOI, frame header, scan header, EOI
# (2 + 13 + 10 + 2; even lossless JPEG has them all). PNG: signature, IHDR, IDAT, IEND
# (8 + 25 + 12 + 12). GIF: header with screen descriptor, image descriptor, LZW code size,
# block terminator, trailer (13 + 10 + 1 + 1 + 1). BMP: file header + BITMAPINFOHEADER
# (14 + 40), the only header TF's BMP decoder reads.
_HEADER_BYTES = {"JPEG": 27, "PNG": 57, "GIF": 26, "BMP": 54}
# No brackets: readable_error takes the message from between the Assert's [ ].
_NO_HEIF_IN_GRAPH = (
    "image is a HEIC/HEIF or AVIF file, which the predict_bytes signature cannot decode (TensorFlow has "
    "no decoder for them); decode it on the client and send the uint8 pixels to the serving_default "
    "signature (python -m tlkeras.predict does), or convert it to JPEG or PNG first"
)
_GRAPH_ORDER = ("JPEG", "PNG", "GIF", "BMP")  # branch index in decode_in_graph


def decode_in_graph(data: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded image, scalar tf.string -> uint8 [size, size, 3] (static shape), TF ops only.

    For the SavedModel's `predict_bytes` signature (run under tf.map_fn there). Checks, each
    a tf.debugging.Assert whose message `readable_error` extracts: over MAX_IMAGE_BYTES;
    empty; HEIC/HEIF or AVIF (TF has no decoder for them: the message says to decode on
    the client and send the pixels to serving_default); not JPEG/PNG/GIF/BMP by magic bytes
    ("image is not a JPEG, PNG, BMP or GIF file"); too short to hold its header ("image is
    truncated (N bytes)"); BMP under 24 bits per pixel; width x height, read from the header without decoding (JPEG:
    extract_jpeg_shape; PNG: IHDR; GIF: logical screen descriptor; BMP: info header), over
    MAX_IMAGE_PIXELS. A corrupt body fails in TF's decoder (InvalidArgumentError).
    Then the pixels go through fit_square.

    What TF's decoders can and cannot do (measured with TF 2.21):
    - PNG: decoded with 4 channels, which honours palette tRNS, single-colour tRNS and
      alpha; composited onto BACKGROUND exactly as decode_bytes does. 16-bit keeps the
      high byte, like decode_bytes.
    - GIF: first frame only, but TF drops transparency (transparent pixels come out
      black, where decode_bytes gives white).
    - BMP: 24- and 32-bit only: TF ignores palettes (8-bit colour BMPs decode to wrong
      colours, 1-bit ones fail), so they are refused. The 4th byte of 32-bit BMPs is
      ignored, as Pillow does for the usual BI_RGB files (many leave it 0; read as alpha,
      the image would vanish into white).
    - JPEG: CMYK is converted like Pillow does. EXIF orientation is NOT applied: it cannot
      soundly be done in the graph, so clients apply EXIF orientation before sending
      (tlkeras's predict CLI sends pixels decoded by decode_bytes).
    - ICC colour profiles are ignored (no colour management in TF): an Adobe RGB or
      Display P3 photo is read as if it were sRGB. `upright_bytes` converts such files
      (and HEIC/AVIF, and rotated ones) to a PNG of decode_bytes' pixels on the client.
    """
    import tensorflow as tf

    data = tf.convert_to_tensor(data, tf.string)
    length = tf.strings.length(data)
    starts = [
        tf.reduce_any([tf.equal(tf.strings.substr(data, 0, len(m)), m) for m in _MAGIC[fmt]]) for fmt in _GRAPH_ORDER
    ]
    kind = tf.argmax(tf.cast(starts, tf.int32), output_type=tf.int32)  # 0 (JPEG) if none
    is_bmp = tf.equal(kind, _GRAPH_ORDER.index("BMP"))

    def fail_unless(condition, template: str, *values):
        """An Assert whose message, with the values filled in, is all readable_error keeps."""
        return tf.debugging.Assert(condition, [tf.strings.format(template, values)])

    # Explicit dependencies: inside map_fn's loop nothing else orders the checks, and each
    # check guards the bytes the next one reads (substr past the end is an internal error).
    with tf.control_dependencies(
        [
            fail_unless(
                length <= MAX_IMAGE_BYTES,
                f"image is over {_MIB} ({{}} bytes); downscale or re-encode it below {_MIB}",
                length,
            ),
            fail_unless(length > 0, "image is empty (0 bytes)"),
        ]
    ):
        head = tf.strings.join([tf.strings.substr(data, 0, 8), b"\0" * 8])  # substr past the end fails
        phone = tf.equal(tf.strings.substr(head, 4, 4), b"ftyp")
        not_phone = fail_unless(tf.logical_not(phone), _NO_HEIF_IN_GRAPH)
    with tf.control_dependencies([not_phone]):
        known = fail_unless(
            tf.reduce_any(starts),
            f"image is not a {_GRAPH_ONE_OF} file; send one of these, or decode it on the client "
            f"and send the uint8 pixels to the serving_default signature",
        )
    with tf.control_dependencies([known]):
        header_bytes = tf.gather([_HEADER_BYTES[fmt] for fmt in _GRAPH_ORDER], kind)
        whole_header = fail_unless(length >= header_bytes, "image is truncated ({} bytes)", length)
    with tf.control_dependencies([whole_header]):
        bits = tf.cond(is_bmp, lambda: _read_uint(data, 28, 2), lambda: tf.constant(24, tf.int64))
        bmp_ok = fail_unless(
            bits >= 24, "image is a BMP with {} bits per pixel; the serving graph reads 24 and 32 only: send PNG", bits
        )
        readers = [_jpeg_size, _png_size, _gif_size, _bmp_size]  # in _GRAPH_ORDER
        width, height = tf.switch_case(kind, [lambda read=read: read(data) for read in readers])
        small = fail_unless(
            width * height <= MAX_IMAGE_PIXELS,
            f"image is {{}}x{{}} pixels, over the {_SIDE}x{_SIDE} limit; downscale it",
            width,
            height,
        )
    with tf.control_dependencies([bmp_ok, small]):
        image = tf.switch_case(
            kind,
            [  # in _GRAPH_ORDER
                # INTEGER_ACCURATE is libjpeg's ISLOW IDCT, Pillow's: the same bytes as
                # decode_bytes. TF's default (IFAST) differs by up to 8 levels.
                lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                # 4 channels: TF applies palette and single-colour tRNS as alpha (measured)
                lambda: composite_in_graph(tf.io.decode_png(data, channels=4)),
                # The first frame only, without decoding every frame into memory as decode_gif does
                lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
                lambda: tf.io.decode_bmp(data, channels=3),  # the 4th byte of 32-bit BMP dropped
            ],
        )
    image.set_shape((None, None, 3))
    return fit_square(image, size)


def _read_uint(data, offset: int, size: int, big_endian: bool = False):
    """The unsigned integer of `size` bytes at `offset` of a scalar string, as int64.

    Byte by byte: tf.io.decode_raw has no uint32, and its int32 would turn PNG sizes of
    2^31 and more negative, slipping under the pixel limit.
    """
    import tensorflow as tf

    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, size), tf.uint8), tf.int64)
    weights = [256**i for i in range(size)]
    return tf.reduce_sum(raw * tf.constant(weights[::-1] if big_endian else weights, tf.int64))


# Header readers for decode_in_graph: scalar string -> (width, height), int64 scalars.
def _jpeg_size(data):
    import tensorflow as tf

    height, width = tf.unstack(tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64))
    return width, height


def _png_size(data):  # IHDR: big-endian uint32 width, height at bytes 16..24
    return _read_uint(data, 16, 4, big_endian=True), _read_uint(data, 20, 4, big_endian=True)


def _gif_size(data):  # logical screen descriptor: little-endian uint16 at bytes 6..10
    return _read_uint(data, 6, 2), _read_uint(data, 8, 2)


def _bmp_size(data):  # BITMAPINFOHEADER: little-endian int32 at 18..26; height < 0: top-down rows
    def signed(value):
        return value - 2**32 * (value // 2**31)

    return abs(signed(_read_uint(data, 18, 4))), abs(signed(_read_uint(data, 22, 4)))


def composite_in_graph(rgba):
    """composite_over_background in TF ops: the same float32 arithmetic, the same bytes."""
    import tensorflow as tf

    rgb = tf.cast(rgba[..., :3], tf.float32)
    alpha = tf.cast(rgba[..., 3:], tf.float32)
    background = tf.constant(BACKGROUND, tf.float32)
    return tf.cast(tf.round((rgb * alpha + background * (255 - alpha)) / 255), tf.uint8)


# "assertion failed: [msg]" in graphs and map_fn; "Summarized data: b'msg'" when eager.
_ASSERT_MESSAGE = re.compile(r"assertion failed: \[([^\]]*)\]|Summarized data: b'([^']*)'")
_TF_NOISE = re.compile(r"\{\{[^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]( name: \S*)?")


def readable_error(e: tf.errors.InvalidArgumentError) -> str:
    """The human part of a decode_in_graph failure, one line, for a client or a test.

    One of its checks -> that check's message ("image is truncated (3 bytes)"). A failure
    inside TF's decoders (corrupt pixel data) -> "image data is corrupt or truncated (<TF's
    reason>)", with the `{{function_node ...}}`, node and device names removed.
    """
    found = _ASSERT_MESSAGE.search(e.message)
    if found:
        return found.group(1) or found.group(2)
    lines = [line.strip() for line in _TF_NOISE.sub("", e.message).splitlines()]
    # Graph errors quote the Python stack ("Detected at node ...", "File ...") before the reason.
    reasons = [
        line for line in lines if line and not line.startswith(("Graph execution error", "Detected at", "File "))
    ]
    return f"image data is corrupt or truncated ({reasons[0] if reasons else 'no reason given'})"
