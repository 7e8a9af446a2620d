"""A hostile-image corpus through every reader: the same documented answer everywhere.

Readers: the file check of the folder / CSV readers and `tfmir index` (`find_unreadable`), the
training pipeline's decoder (`read_image_file`), a SavedModel from `tfmir export` as `tfmir
search` / `tfmir index` feed it (`tfmir.images.graph_bytes`), the HTTP service (`POST /search`),
and `tfmir index` on a folder holding the whole corpus. The pixels of every accepted image are
compared with an oracle written here with PIL and NumPy (EXIF transpose, first GIF frame, 16-bit
values / 257, the DICOM window by hand), not with the code under test.
"""

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.serving import build_archive, request
from tfmir.images import DEFAULT_MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE

# name -> (what every reader answers, words of the reason; None = accepted). HTTP status: 413
# for too many pixels, 400 for every other refusal.
ACCEPTED = ("cmyk.jpg", "gray16.png", "alpha.png", "exif_rotated.jpg", "animated.gif",
            "caf\udce9.png", "scan.dcm")
REFUSED = {
    "truncated.jpg": (400, "corrupt"),
    "empty.png": (400, "an empty file"),
    "text.png": (400, "not in a known image format"),
    "bomb.png": (413, "20000 × 20000 = 400000000 pixels, more than max_image_pixels"),
    "sixty_megapixels.png": (413, "7746 × 7746 = 60000516 pixels, more than max_image_pixels"),
    "jpeg_header_8000.jpg": (413, "8000 × 8000 = 64000000 pixels, more than max_image_pixels"),
    "one_pixel.png": (400, f"a side shorter than the minimum of {MIN_IMAGE_SIDE}"),
}


def _pixels(height, width, seed=0):
    """A smooth colour image with distinct quadrants, so a wrong turn or mirror shows."""
    rows, columns = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * rows / height, 255 * columns / width,
                       128 + 100 * ((rows < height // 2) ^ (columns < width // 3))], axis=-1)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _encode(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _png_of_zeros(width, height):
    """A valid 8-bit gray PNG of zeros, compressed row by row (a bomb: tiny file, huge image)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    compressed = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                              0, 0, 0))
            + chunk(b"IDAT", compressed) + chunk(b"IEND", b""))


def _jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF0 frame header rewritten to claim width × height."""
    marker = jpeg.index(b"\xff\xc0")
    # FFC0, length (2), precision (1), height (2), width (2).
    return (jpeg[:marker + 5] + struct.pack(">HH", height, width) + jpeg[marker + 9:])


def _dicom(path, stored):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1000
    dataset.WindowCenter, dataset.WindowWidth = 0, 2000
    dataset.PixelData = stored.astype("<u2").tobytes()
    dataset.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus on disk and, per accepted file, the oracle's upright uint8 RGB pixels."""
    root = tmp_path_factory.mktemp("hostile")
    pixels = _pixels(40, 64)
    files, oracle = {}, {}
    jpeg = _encode(Image.fromarray(pixels), "JPEG", quality=95)
    files["cmyk.jpg"] = _encode(Image.fromarray(pixels).convert("CMYK"), "JPEG", quality=95)
    gray16 = (np.linspace(0, 65535, 40 * 64).reshape(40, 64)).astype(np.uint16)
    files["gray16.png"] = _encode(Image.fromarray(gray16), "PNG")
    oracle["gray16.png"] = np.repeat(((gray16.astype(np.int64) + 128) // 257)
                                     .astype(np.uint8)[..., None], 3, axis=-1)
    rgba = np.concatenate([pixels, np.full((40, 64, 1), 7, np.uint8)], axis=-1)
    files["alpha.png"] = _encode(Image.fromarray(rgba), "PNG")
    oracle["alpha.png"] = pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: the file's pixels must be turned 90° clockwise
    files["exif_rotated.jpg"] = _encode(Image.fromarray(pixels), "JPEG", quality=95,
                                        exif=exif.tobytes())
    frames = [Image.fromarray(pixels), Image.fromarray(255 - pixels)]
    files["animated.gif"] = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    files["caf\udce9.png"] = _encode(Image.fromarray(pixels[::-1]), "PNG")  # upside down
    oracle["caf\udce9.png"] = pixels[::-1]
    files["truncated.jpg"] = jpeg[:len(jpeg) // 2]
    files["empty.png"] = b""
    files["text.png"] = b"this is a text file, not an image\n"
    files["bomb.png"] = _png_of_zeros(20000, 20000)
    files["sixty_megapixels.png"] = _png_of_zeros(7746, 7746)
    files["jpeg_header_8000.jpg"] = _jpeg_claiming(jpeg, 8000, 8000)
    files["one_pixel.png"] = _encode(Image.fromarray(pixels[:1, :1]), "PNG")
    for name, data in files.items():
        # A bytes path: the non-UTF-8 name is written as those bytes.
        with open(os.path.join(os.fsencode(root), os.fsencode(name)), "wb") as stream:
            stream.write(data)
    for name in ("cmyk.jpg", "exif_rotated.jpg", "animated.gif"):
        with Image.open(root / name) as image:  # PIL's decoder, EXIF turned, the first frame
            oracle[name] = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    stored = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) % 4096
    _dicom(root / "scan.dcm", stored)
    # Hounsfield units = stored - 1000; window 0 ± 1000 -> [-1000, 1000] onto 0..255.
    units = np.clip(stored.astype(np.float64) - 1000, -1000, 1000)
    gray = np.rint((units + 1000) / 2000 * 255).astype(np.uint8)
    oracle["scan.dcm"] = np.repeat(gray[..., None], 3, axis=-1)
    assert oracle["exif_rotated.jpg"].shape == (64, 40, 3)  # the oracle did turn it
    assert len(files["bomb.png"]) < 1_000_000  # a bomb: under a megabyte for 400 M pixels
    return root, oracle


def _assert_same_pixels(decoded, expected, name):
    assert decoded.shape == expected.shape, name
    # PNG, GIF and DICOM are lossless (exact); JPEG decoders round differently by a few levels.
    tolerance = 3.0 if name.endswith(".jpg") else 0.0
    assert np.abs(decoded.astype(float) - expected.astype(float)).mean() <= tolerance, name


def test_the_file_check_accepts_and_refuses_the_documented_files(corpus):
    from tfmir.data import find_unreadable

    root, _ = corpus
    paths = [str(root / name) for name in (*ACCEPTED, *REFUSED)]
    reasons = dict(find_unreadable(paths))
    assert set(reasons) == {str(root / name) for name in REFUSED}
    for name, (_, words) in REFUSED.items():
        assert words in reasons[str(root / name)], (name, reasons[str(root / name)])


def test_the_training_decoder_gives_the_oracles_pixels(corpus):
    from tfmir.data import read_image_file

    root, oracle = corpus
    for name in ACCEPTED:
        decoded = read_image_file(os.fsencode(str(root / name))).numpy()
        _assert_same_pixels(decoded, oracle[name], name)


@pytest.fixture(scope="module")
def archive(shared_data_dir, tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("archive"), shared_data_dir)


def test_a_saved_model_sees_the_same_pixels(corpus, archive):
    import tensorflow as tf

    from tfmir.export import resolve_export_directory
    from tfmir.images import ImageError, graph_bytes

    root, oracle = corpus
    loaded = tf.saved_model.load(resolve_export_directory(archive.export))
    serve, pixels = loaded.signatures["serving_default"], loaded.signatures["embed_pixels"]
    for name in ACCEPTED:
        data = graph_bytes((root / name).read_bytes())
        from_bytes = serve(images=tf.constant([data]))["embedding"].numpy()
        from_oracle = pixels(pixels=tf.constant(oracle[name][None], tf.float32))["embedding"]
        np.testing.assert_allclose(from_bytes, from_oracle.numpy(), atol=0.05, err_msg=name)
    for name, (status, words) in REFUSED.items():
        data = (root / name).read_bytes()
        if name == "truncated.jpg":  # a sound header: the graph's decoder refuses it
            with pytest.raises(tf.errors.InvalidArgumentError, match="Invalid JPEG data"):
                serve(images=tf.constant([graph_bytes(data)]))
            continue
        with pytest.raises(ImageError, match=words.replace("×", ".")) as refused:
            graph_bytes(data)
        assert refused.value.too_large == (status == 413), name
        # And the graph's own header check, for clients that send bytes to TF Serving directly.
        if data.startswith((b"\x89PNG", b"\xff\xd8")):
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match="max_image_pixels" if status == 413 else "minimum"):
                serve(images=tf.constant([data]))


def test_the_service_answers_the_documented_status(corpus, archive):
    from tests.serving.test_server import _Running

    root, _ = corpus
    with _Running(archive.index, archive.export, k=3,
                  max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS) as url:
        for name in ACCEPTED:
            status, body, _ = request(url + "/search", "POST", (root / name).read_bytes(),
                                      {"Content-Type": "application/octet-stream"})
            assert status == 200, (name, body)
            assert len(body["results"]) == 3
        for name, (expected, words) in REFUSED.items():
            status, body, _ = request(url + "/search", "POST", (root / name).read_bytes(),
                                      {"Content-Type": "application/octet-stream"})
            assert status == expected, (name, body)
            if name != "truncated.jpg":  # its header is sound: the model's decoder refuses it
                assert words in body["error"], (name, body)


def _tfmir(*arguments):
    return subprocess.run([sys.executable, "-m", "tfmir.cli", *map(os.fsencode, arguments)],
                          capture_output=True, text=True, errors="surrogateescape", timeout=600)


def test_tfmir_index_and_search_take_the_accepted_files_and_name_each_refused_one(
        corpus, archive, tmp_path):
    root, _ = corpus
    output = tmp_path / "index"
    result = _tfmir("index", f"--model={archive.export}", f"--data={root}", f"--output={output}",
                    "--kind=exact")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    with open(output / "manifest.json") as stream:
        manifest = json.load(stream)
    assert manifest["count"] == len(ACCEPTED)
    for name, (_, words) in REFUSED.items():
        assert any(name in line and words in line for line in result.stderr.splitlines()), name

    # Each accepted file as a query finds itself first (the same decoding on both sides).
    result = _tfmir("search", f"--index={output}", f"--model={archive.export}", "--k=1",
                    *(str(root / name) for name in ACCEPTED))
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    assert [answer["results"][0]["id"] for answer in answers] == list(ACCEPTED)
    # A refused query: one line naming it and the reason, nothing searched.
    for name, (_, words) in REFUSED.items():
        result = _tfmir("search", f"--index={output}", f"--model={archive.export}",
                        str(root / name))
        assert result.returncode != 0 and "Traceback" not in result.stderr, name
        assert name in result.stderr and words in result.stderr, (name, result.stderr[-2000:])
        assert result.stdout == "", name


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_every_exif_orientation_is_turned_upright_like_pil(byte_order):
    from tfmir.data import decode_image
    from tfmir.data.pipeline import exif_orientation

    pixels = _pixels(24, 40)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif.endian = byte_order  # "II" (phones) and "MM" (many cameras) TIFF headers
        exif[0x010F] = "maker"  # another tag first, so the search walks the directory
        exif[0x0112] = orientation
        data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
        with Image.open(io.BytesIO(data)) as image:
            expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        assert int(exif_orientation(data)) == orientation
        _assert_same_pixels(decode_image(data).numpy(), expected, f"{orientation}.jpg")
    # No EXIF, or not a JPEG: upright.
    assert int(exif_orientation(_encode(Image.fromarray(pixels), "JPEG"))) == 1
    assert int(exif_orientation(_encode(Image.fromarray(pixels), "PNG"))) == 1


def test_the_pixel_budget_lets_only_what_fits_decode_at_once():
    import threading
    import time

    from tfmir.serving.service import PixelBudget

    budget = PixelBudget(100)
    held, inside = [], []
    lock = threading.Lock()

    def query(pixels):
        with budget.hold(pixels):
            with lock:
                inside.append(pixels)
                held.append((budget.held, len(inside)))
            time.sleep(0.02)
            with lock:
                inside.remove(pixels)

    # Eight 60-pixel images: never two at once; a 1000-pixel one holds the whole budget alone.
    threads = [threading.Thread(target=query, args=(pixels,)) for pixels in [60] * 8 + [1000]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(held) == 9 and all(count == 1 and total <= 100 for total, count in held)
    assert budget.held == 0
    with pytest.raises(ValueError, match="capacity"):
        PixelBudget(0)
