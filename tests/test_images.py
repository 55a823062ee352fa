"""Every image a person sends: decoded right, or refused in one readable line."""

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import ExifTags, Image

from tlkeras.images import (
    BACKGROUND,
    MAX_IMAGE_BYTES,
    ImageError,
    decode_bytes,
    decode_file,
    decode_in_graph,
    fit_square,
    readable_error,
    shown,
    sniff_file,
    upright_bytes,
)

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
WHITE = np.array((255, 255, 255), np.uint8)
MAGENTA, BLUE = (255, 0, 255), (0, 0, 255)


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one empty IDAT: a few dozen bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def blocks(height: int, width: int) -> np.ndarray:
    """An asymmetric image of flat colour blocks; with sides multiples of 32 every edge lies
    on JPEG's 8x8 grid, so JPEG at 4:4:4 keeps it almost exactly."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 4] = (255, 0, 0)
    image[height // 2 :, width // 2 :] = (0, 255, 0)
    image[: height // 4, width // 2 :] = (0, 0, 255)
    return image


def rgba_over_magenta() -> np.ndarray:
    """Left half fully transparent magenta, right half opaque blue, one 50% magenta pixel."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (*MAGENTA, 0)
    rgba[:, 4:] = (*BLUE, 255)
    rgba[0, 4] = (*MAGENTA, 128)
    return rgba


# --- decode_bytes / decode_file: what comes out -------------------------------------------


@pytest.mark.parametrize("fmt, tolerance", [("PNG", 0), ("BMP", 0), ("GIF", 0), ("JPEG", 8)])
def test_each_format_decodes_to_rgb(tmp_path, fmt, tolerance):
    source = blocks(32, 64)
    options = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    pixels = decode_file(write(tmp_path, f"x.{fmt.lower()}", encode(source, fmt, **options)))
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 64, 3)
    assert np.abs(pixels.astype(int) - source).max() <= tolerance


def test_animated_gif_gives_its_first_frame(tmp_path):
    red, green = (Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0)))
    path = write(tmp_path, "anim.gif", encode(red, "GIF", save_all=True, append_images=[green], duration=50))
    assert Image.open(path).n_frames == 2
    np.testing.assert_array_equal(decode_file(path), np.full((16, 16, 3), (255, 0, 0), np.uint8))


def test_16_bit_png_keeps_the_high_byte_not_a_clipped_value(tmp_path):
    samples = np.array([[0x0000, 0x1234, 0x80FF, 0xFFFF]], np.uint16)
    pixels = decode_file(write(tmp_path, "deep.png", tf.io.encode_png(samples[..., None]).numpy()))
    np.testing.assert_array_equal(pixels[0, :, 0], [0x00, 0x12, 0x80, 0xFF])  # Pillow's own L: 255s
    assert (pixels == pixels[..., :1]).all()  # gray -> equal channels


def test_palette_png_transparent_entry_becomes_white(tmp_path):
    assert BACKGROUND == (255, 255, 255)
    image = Image.new("P", (4, 4), 0)
    image.putpalette([*MAGENTA, *BLUE] + [0] * 762)
    image.putpixel((3, 3), 1)
    pixels = decode_file(write(tmp_path, "palette.png", encode(image, "PNG", transparency=0)))
    assert (pixels[:3, :3] == WHITE).all()
    assert tuple(pixels[3, 3]) == BLUE


def test_gif_transparency_becomes_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([*MAGENTA, *BLUE] + [0] * 762)
    image.putpixel((3, 3), 1)
    data = encode(image, "GIF", transparency=0)
    pixels = decode_file(write(tmp_path, "clear.gif", data))
    assert (pixels[:3, :3] == WHITE).all() and tuple(pixels[3, 3]) == BLUE
    # Measured TF limitation, documented in decode_in_graph: its GIF decoder paints them black.
    graph = decode_in_graph(tf.constant(data), 4).numpy()
    assert (graph[:3, :3] == 0).all() and tuple(graph[3, 3]) == BLUE


def test_rgba_png_transparent_region_becomes_white_not_the_stored_magenta(tmp_path):
    pixels = decode_file(write(tmp_path, "alpha.png", encode(rgba_over_magenta(), "PNG")))
    assert (pixels[:, :4] == WHITE).all()
    assert (pixels[1:, 4:] == BLUE).all()
    # 50% magenta over white: round((255*128 + 255*127)/255), round(255*127/255), ...
    assert tuple(pixels[0, 4]) == (255, 127, 255)


def test_cmyk_jpeg_and_grayscale_become_rgb(tmp_path):
    cmyk = decode_file(write(tmp_path, "cmyk.jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")))
    assert cmyk.shape == (16, 16, 3) and np.abs(cmyk.astype(int) - (255, 0, 0)).max() <= 2
    gray = decode_file(write(tmp_path, "gray.png", encode(Image.new("L", (5, 7), 77), "PNG")))
    np.testing.assert_array_equal(gray, np.full((7, 5, 3), 77, np.uint8))


def test_exif_orientation_6_is_applied(tmp_path):
    upright = blocks(32, 64)
    stored = np.rot90(upright)  # orientation 6: "rotate 90 degrees clockwise to display"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    path = write(tmp_path, "phone.jpg", encode(stored, "JPEG", quality=95, subsampling=0, exif=exif))
    pixels = decode_file(path)
    assert pixels.shape == upright.shape  # TF alone returns it 64x32, sideways (tensorflow#33932)
    assert np.abs(pixels.astype(int) - upright).max() <= 8  # JPEG noise, not a turned image


# --- refusals -----------------------------------------------------------------------------

JPEG = encode(NOISE, "JPEG")
PNG = encode(NOISE, "PNG")
CORRUPT_IHDR = PNG[:24] + bytes([PNG[24] ^ 0x0F]) + PNG[25:]  # bit depth changed, CRC now wrong

REFUSED = {
    "empty.png": (b"", "empty file (0 bytes)"),
    "signature.png": (PNG[:8], "corrupt or truncated PNG header"),
    "twenty.png": (PNG[:20], "corrupt or truncated PNG header"),
    "start.jpg": (b"\xff\xd8\xff", "corrupt or truncated JPEG header"),
    "half.jpg": (JPEG[: len(JPEG) // 2], "truncated or corrupt JPEG image data"),
    "half.png": (PNG[: len(PNG) // 2], "truncated or corrupt PNG image data"),
    "ihdr.png": (CORRUPT_IHDR, "corrupt or truncated PNG header"),
    "photo.webp": (
        encode(NOISE, "WEBP"),
        "is a WEBP image; tlkeras reads JPEG, PNG, BMP, GIF, HEIC/HEIF and AVIF: convert it",
    ),
    "scan.tiff": (encode(NOISE, "TIFF"), "is a TIFF image"),
    "notes.txt": (b"just some notes\nnot an image\n", "is a text file, not an image"),
    "huge.png": (png_header_only(5000, 5000), "5000x5000 image (25000000 pixels) is over the 4096x4096 limit"),
}


def assert_one_readable_line(message: str, *parts: str) -> None:
    assert "\n" not in message and "{{function_node" not in message and "Traceback" not in message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize("name", REFUSED)
def test_bad_files_are_refused_in_one_line_naming_the_file(tmp_path, name):
    data, reason = REFUSED[name]
    path = write(tmp_path, name, data)
    with pytest.raises(ImageError) as caught:
        decode_file(path)
    message = str(caught.value)
    assert_one_readable_line(message, reason)
    assert message.startswith(f"'{path}': ")


def test_over_16_mib_is_refused_from_its_size_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    with path.open("wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: costs no disk

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was opened")

    monkeypatch.setattr(Path, "open", no_reading)
    monkeypatch.setattr(Path, "read_bytes", no_reading)
    with pytest.raises(ImageError) as caught:
        decode_file(path)
    assert_one_readable_line(
        str(caught.value), f"'{path}'", "over the 16 MiB limit", "downscale or re-encode it below 16 MiB"
    )


def test_over_16_mib_bytes_and_a_missing_file(tmp_path):
    with pytest.raises(ImageError, match="16.0 MiB, over the 16 MiB limit"):
        decode_bytes(PNG[:8] + bytes(MAX_IMAGE_BYTES), "upload")
    with pytest.raises(ImageError) as caught:
        decode_file(tmp_path / "nowhere.jpg")
    assert_one_readable_line(str(caught.value), "nowhere.jpg", "No such file or directory")


# --- fit_square ---------------------------------------------------------------------------


def test_fit_square_is_identity_at_its_size():
    square = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_square(square, 32).numpy(), square)


@pytest.mark.parametrize("transpose", [False, True], ids=["wide", "tall"])
def test_fit_square_crops_the_centre_instead_of_squashing(transpose):
    thirds = np.zeros((30, 90, 3), np.uint8)
    thirds[:, :30], thirds[:, 30:60], thirds[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    image = thirds.transpose(1, 0, 2) if transpose else thirds
    out = fit_square(image, 16).numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.full((16, 16, 3), (0, 255, 0), np.uint8))  # no red, no blue


def test_fit_square_in_tf_data_and_in_a_graph_with_dynamic_sizes():
    fn = tf.function(lambda x: fit_square(x, 8), input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    assert fn.get_concrete_function().structured_outputs.shape.as_list() == [8, 8, 3]
    images = [NOISE, NOISE[:, :30], NOISE[:9, :13]]
    ds = tf.data.Dataset.from_generator(lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    for got, image in zip(ds.map(lambda x: fit_square(x, 8)), images):
        np.testing.assert_array_equal(got.numpy(), fn(image).numpy())
    with pytest.raises(TypeError, match="uint8"):
        fit_square(NOISE.astype(np.float32), 8)


# --- decode_in_graph: the SavedModel's bytes signature --------------------------------------


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def serve_bytes(batch):
    """The way export.py runs decode_in_graph: map_fn inside a graph."""
    return tf.map_fn(
        lambda data: decode_in_graph(data, 24), batch, fn_output_signature=tf.TensorSpec([24, 24, 3], tf.uint8)
    )


SAME_PIXELS = {
    "JPEG": encode(NOISE, "JPEG", quality=90),
    "progressive JPEG": encode(blocks(32, 64), "JPEG", progressive=True),
    "PNG": encode(NOISE, "PNG"),
    "BMP": encode(NOISE, "BMP"),
    "GIF": encode(Image.fromarray(NOISE).quantize(64), "GIF"),
    "grayscale PNG": encode(Image.fromarray(NOISE).convert("L"), "PNG"),
    "RGBA PNG over magenta": encode(rgba_over_magenta(), "PNG"),
    "palette PNG with transparency": encode(Image.fromarray(NOISE).quantize(16), "PNG", transparency=3),
    "16-bit PNG": tf.io.encode_png(RNG.integers(0, 65536, (20, 30, 1), dtype=np.uint16)).numpy(),
}


def test_graph_decodes_like_decode_bytes_then_fit_square():
    # Exact, measured: the graph decodes JPEG with libjpeg's ISLOW IDCT as Pillow does
    # (TF's default IFAST differed by up to 8 levels), and both composite alpha alike.
    expected = [fit_square(decode_bytes(data), 24).numpy() for data in SAME_PIXELS.values()]
    for got, want, name in zip(serve_bytes(tf.constant(list(SAME_PIXELS.values()))), expected, SAME_PIXELS):
        np.testing.assert_array_equal(got.numpy(), want, err_msg=name)
    eager = decode_in_graph(tf.constant(SAME_PIXELS["RGBA PNG over magenta"]), 8).numpy()
    assert (eager[:, :4] == WHITE).all() and (eager[1:, 4:] == BLUE).all()


GRAPH_REFUSED = {
    "empty": (b"", "image is empty (0 bytes)"),
    "PNG signature only": (PNG[:8], "image is truncated (8 bytes)"),
    "20-byte PNG": (PNG[:20], "image is truncated (20 bytes)"),
    "JPEG start marker only": (b"\xff\xd8\xff", "image is truncated (3 bytes)"),
    "WebP": (encode(NOISE, "WEBP"), "image is not a JPEG, PNG, BMP or GIF file"),
    "TIFF": (encode(NOISE, "TIFF"), "image is not a JPEG, PNG, BMP or GIF file"),
    "text": (b"just some notes\n", "image is not a JPEG, PNG, BMP or GIF file"),
    "5000x5000 PNG header": (png_header_only(5000, 5000), "image is 5000x5000 pixels, over the 4096x4096 limit"),
    "over 16 MiB": (PNG[:8] + bytes(MAX_IMAGE_BYTES), f"image is over 16 MiB ({MAX_IMAGE_BYTES + 8} bytes)"),
    "8-bit BMP": (encode(Image.fromarray(NOISE).quantize(16), "BMP"), "image is a BMP with 8 bits per pixel"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], "image data is corrupt or truncated (jpeg::Uncompress failed"),
    "truncated PNG": (PNG[: len(PNG) // 2], "image data is corrupt or truncated (Invalid PNG data"),
    "corrupt IHDR": (CORRUPT_IHDR, "image data is corrupt or truncated (Invalid PNG"),
}


@pytest.mark.parametrize("name", GRAPH_REFUSED)
def test_graph_refuses_with_a_readable_reason(name):
    data, reason = GRAPH_REFUSED[name]
    for run in (lambda: decode_in_graph(tf.constant(data), 24), lambda: serve_bytes(tf.constant([data]))):
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            run()
        message = readable_error(caught.value)
        assert_one_readable_line(message, reason)
        assert "node" not in message and "device" not in message


def test_upright_bytes_sends_the_graph_what_decode_bytes_sees():
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    sideways = encode(np.rot90(blocks(32, 64)), "JPEG", exif=exif)
    sent = upright_bytes(sideways)
    np.testing.assert_array_equal(
        decode_in_graph(tf.constant(sent), 24).numpy(), fit_square(decode_bytes(sideways), 24).numpy()
    )
    assert upright_bytes(PNG) is PNG  # nothing to turn: sent as it is


# --- phone formats, content over names, colour profiles, names --------------------------


def heic(pixels: np.ndarray) -> bytes:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()  # lets Image.save write HEIF in this test
    return encode(pixels, "HEIF", quality=95)


def avif(pixels: np.ndarray) -> bytes:
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow was built without AVIF")
    return encode(pixels, "AVIF", quality=95)


@pytest.mark.parametrize("make", [heic, avif], ids=["HEIC", "AVIF"])
@pytest.mark.parametrize("name", ["IMG_0001.HEIC", "photo.avif", "IMG_0001.jpg", "no-extension"])
def test_heic_and_avif_decode_whatever_the_file_is_called(tmp_path, make, name):
    photo = blocks(64, 96)
    path = write(tmp_path, name, make(photo))
    pixels = decode_file(path)
    assert pixels.shape == photo.shape and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - photo).mean() < 4  # lossy coding of flat blocks
    assert sniff_file(path) in ("HEIF", "AVIF")


@pytest.mark.parametrize("name", ["a.jfif", "b.jpe", "c.jif", "d.JPG", "e", "f.dat", "g.png"])
def test_jpegs_are_read_by_content_whatever_their_name(tmp_path, name):
    path = write(tmp_path, name, encode(blocks(32, 32), "JPEG", quality=95, subsampling=0))
    assert sniff_file(path) == "JPEG"
    assert np.abs(decode_file(path).astype(int) - blocks(32, 32)).max() <= 8


@pytest.mark.parametrize("make", [heic, avif], ids=["HEIC", "AVIF"])
def test_the_graph_refuses_heic_and_avif_naming_the_fix_and_upright_bytes_converts_them(make):
    data = make(blocks(64, 64))
    for run in (lambda: decode_in_graph(tf.constant(data), 24), lambda: serve_bytes(tf.constant([data]))):
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            run()
        message = readable_error(caught.value)
        assert_one_readable_line(
            message, "image is a HEIC/HEIF or AVIF file", "decode it on the client", "serving_default"
        )
    sent = upright_bytes(data)
    assert sent.startswith(b"\x89PNG")
    np.testing.assert_array_equal(
        decode_in_graph(tf.constant(sent), 24).numpy(), fit_square(decode_bytes(data), 24).numpy()
    )


# Display P3 primaries adapted to D50 (what an ICC profile stores), and sRGB's, as XYZ columns.
P3_D50 = np.array([[0.515102, 0.291965, 0.157153], [0.241182, 0.692236, 0.066588], [-0.001050, 0.041882, 0.784168]])
SRGB_D50 = np.array([[0.436066, 0.385147, 0.143066], [0.222488, 0.716873, 0.060608], [0.013916, 0.097076, 0.714096]])


def display_p3_profile() -> bytes:
    """A Display P3 ICC profile: LittleCMS's sRGB profile with P3's colorants written in (the
    two share the sRGB tone curve) and its description renamed (13 UTF-16 characters)."""
    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack(">I", data[128:132])
    tags = {}
    for i in range(count):
        sig, offset, size = struct.unpack(">4sII", data[132 + 12 * i : 144 + 12 * i])
        tags[sig] = (offset, size)
    for column, sig in enumerate((b"rXYZ", b"gXYZ", b"bXYZ")):
        offset, _ = tags[sig]
        data[offset + 8 : offset + 20] = struct.pack(">3i", *(round(v * 65536) for v in P3_D50[:, column]))
    offset, size = tags[b"desc"]
    old = "sRGB built-in".encode("utf-16-be")
    at = data.index(old, offset, offset + size)
    data[at : at + len(old)] = "Display P3 tl".encode("utf-16-be")
    data[84:100] = bytes(16)  # no profile ID (an MD5 of the old bytes)
    return bytes(data)


def srgb_from_p3(pixels: np.ndarray) -> np.ndarray:
    """What a colour-managed viewer shows for Display P3 pixels, computed with numpy."""

    def linear(v):
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)

    def encoded(v):
        v = np.clip(v, 0, 1)
        return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)

    rgb = linear(pixels.astype(np.float64) / 255) @ (np.linalg.inv(SRGB_D50) @ P3_D50).T
    return np.round(encoded(rgb) * 255).astype(int)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_display_p3_photo_is_converted_to_the_srgb_a_viewer_shows(tmp_path, fmt):
    colours = np.array([[200, 100, 50], [40, 160, 90], [90, 90, 200], [128, 128, 128]], np.uint8)
    stored = np.repeat(np.repeat(colours[np.newaxis], 16, axis=0), 16, axis=1)  # 16 x 64, four blocks
    options = {"quality": 98, "subsampling": 0} if fmt == "JPEG" else {}
    path = write(tmp_path, f"p3.{fmt.lower()}", encode(stored, fmt, icc_profile=display_p3_profile(), **options))
    pixels = decode_file(path).astype(int)
    expected = srgb_from_p3(colours)
    centres = pixels[8, 8::16]  # the middle of each block
    tolerance = 2 if fmt == "PNG" else 4
    assert np.abs(centres - expected).max() <= tolerance, (centres, expected)
    assert np.abs(centres[:3] - colours[:3]).max() >= 15  # saturated colours move: P3 is wider than sRGB
    assert np.abs(centres[3] - 128).max() <= tolerance  # grey stays grey
    # The same file with an sRGB profile, or none: the stored values.
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for profile in ({"icc_profile": srgb}, {}):
        same = write(tmp_path, "plain.png", encode(stored, "PNG", **profile))
        np.testing.assert_array_equal(decode_file(same), stored)


def test_upright_bytes_sends_the_graph_the_srgb_pixels_of_a_p3_photo():
    stored = blocks(32, 32)
    data = encode(stored, "PNG", icc_profile=display_p3_profile())
    sent = upright_bytes(data)
    assert sent != data
    np.testing.assert_array_equal(
        decode_in_graph(tf.constant(sent), 24).numpy(), fit_square(decode_bytes(data), 24).numpy()
    )


def test_a_p3_png_with_alpha_keeps_its_transparency_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (200, 100, 50, 255)
    rgba[:, 4:] = (0, 0, 0, 0)
    path = write(tmp_path, "p3a.png", encode(Image.fromarray(rgba, "RGBA"), "PNG", icc_profile=display_p3_profile()))
    pixels = decode_file(path).astype(int)
    assert (pixels[:, 4:] == 255).all()
    assert np.abs(pixels[4, 1] - srgb_from_p3(np.array([200, 100, 50]))).max() <= 2


def test_a_damaged_profile_leaves_the_pixels_as_stored(tmp_path):
    stored = blocks(32, 32)
    path = write(tmp_path, "odd.png", encode(stored, "PNG", icc_profile=b"not a profile at all"))
    np.testing.assert_array_equal(decode_file(path), stored)


def test_names_that_are_not_utf8_are_read_and_shown_escaped(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9-\x81.png"  # Latin-1 e-acute, and a byte no codec maps
    with open(name, "wb") as f:
        f.write(encode(blocks(32, 32), "PNG"))
    as_str = os.fsdecode(name)
    for path in (name, as_str, Path(as_str)):
        np.testing.assert_array_equal(decode_file(path), blocks(32, 32))
    assert shown(as_str).endswith("caf\\xe9-\\x81.png")
    shown(as_str).encode("utf-8")  # printable anywhere
    assert shown("new\nline.jpg") == "new\\nline.jpg"
    with open(name, "wb") as f:
        f.write(b"broken")
    with pytest.raises(ImageError) as caught:
        decode_file(name)
    assert "caf\\xe9-\\x81.png" in str(caught.value)
    str(caught.value).encode("utf-8")
