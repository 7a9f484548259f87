"""Inputs as hospitals and biobanks deliver them: each is read right, or refused for that image alone with the fix."""

from __future__ import annotations

import gzip
from pathlib import Path

import gdcm
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from monai.data import ITKReader
from PIL import Image
from preprocess_fixtures import (
    BRAIN_CONFIG,
    KEY,
    PLANTED,
    SMALL_BRAIN,
    SMALL_XRAY,
    XRAY_CONFIG,
    head_volume,
    radiograph,
    searchable_bytes,
    write_dicom_xray,
    write_nifti,
    write_png,
)
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import HTJ2KLossless

from mimm_med.data.preprocess import PreprocessPipeline, describe_error, load_pipeline_config, preprocess_records
from mimm_med.data.pseudonym import Pseudonymiser
from mimm_med.data.readers import LoadImageBySuffixd


@pytest.fixture(scope="module")
def xray():
    return PreprocessPipeline(load_pipeline_config(XRAY_CONFIG, SMALL_XRAY))


@pytest.fixture(scope="module")
def brain():
    return PreprocessPipeline(load_pipeline_config(BRAIN_CONFIG, SMALL_BRAIN))


def processed(pipeline: PreprocessPipeline, source: Path, out: Path) -> np.ndarray:
    path = pipeline(source, out / source.stem)
    return nib.load(path).get_fdata() if path.name.endswith(".nii.gz") else np.asarray(Image.open(path), float)


def failure(pipeline: PreprocessPipeline, source: Path, out: Path) -> str:
    """The reason ``errors.csv`` would give for ``source``."""
    with pytest.raises(Exception) as error:
        pipeline(source, out / source.stem)
    return describe_error(error.value)


def edit_dicom(path: Path, **values) -> Path:
    ds = pydicom.dcmread(path)
    for name, value in values.items():
        setattr(ds, name, value)
    ds.save_as(path)
    return path


def colour_dicom(path: Path, grey: np.ndarray) -> Path:
    """An 8-bit RGB secondary capture of ``grey``, with the planted identifiers."""
    write_dicom_xray(path, grey)
    return edit_dicom(
        path, PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0, BitsAllocated=8,
        BitsStored=8, HighBit=7, PixelData=np.repeat(grey[..., None], 3, -1).astype(np.uint8).tobytes(),
    )


def htj2k_dicom(path: Path) -> Path:
    """A radiograph in HTJ2K, a syntax no installed plugin decodes; the frame is a bare codestream marker pair."""
    write_dicom_xray(path, radiograph())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def gdcm_compressed(source: Path, target: Path, syntax: int) -> Path:
    """``source`` recompressed by GDCM into the transfer syntax ``syntax`` (a ``gdcm.TransferSyntax`` constant)."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


def without_preamble(path: Path) -> Path:
    """Rewrite a DICOM file as its bare data set: no 128-byte preamble, no ``DICM``, no file meta."""
    ds = pydicom.dcmread(path)
    del ds.file_meta
    with path.open("wb") as file:
        out = DicomFileLike(file)
        out.is_little_endian, out.is_implicit_VR = True, True
        write_dataset(out, ds)
    return path


def test_nifti_without_orientation_codes_is_refused_not_flipped(brain, tmp_path):
    # nibabel would assume LAS and swap left and right of this RAS volume.
    image = nib.Nifti1Image(head_volume(1), np.diag([2.0, 2.0, 2.0, 1.0]))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, tmp_path / "T1.nii.gz")
    reason = failure(brain, tmp_path / "T1.nii.gz", tmp_path)
    assert "qform_code and sform_code 0" in reason and "dcm2niix" in reason


def test_nifti_with_only_a_qform_reads_like_one_with_both(brain, tmp_path):
    volume = head_volume(1)
    volume[16:, 16:, 16:] *= 0.5  # so that a flip would show
    reference = processed(brain, write_nifti(tmp_path / "both" / "T1.nii.gz", volume), tmp_path / "a")
    image = nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    image.set_qform(image.affine, code="scanner")
    image.set_sform(None, code=0)
    nib.save(image, tmp_path / "qform.nii.gz")
    np.testing.assert_allclose(processed(brain, tmp_path / "qform.nii.gz", tmp_path / "b"), reference, atol=1e-6)


def test_colour_dicom_reads_as_its_luminance(xray, tmp_path):
    grey = (radiograph() // 16).astype(np.uint8)
    reference = write_dicom_xray(tmp_path / "grey.dcm", grey)
    edit_dicom(reference, BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=grey.tobytes())
    colour = colour_dicom(tmp_path / "colour.dcm", grey)
    np.testing.assert_array_equal(processed(xray, colour, tmp_path), processed(xray, reference, tmp_path))


def test_dicom_without_preamble_reads_and_other_files_are_no_dicom(xray, tmp_path):
    pixels = radiograph()
    reference = processed(xray, write_dicom_xray(tmp_path / "with.dcm", pixels), tmp_path)
    bare = without_preamble(write_dicom_xray(tmp_path / "bare.dcm", pixels))
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(processed(xray, bare, tmp_path), reference)
    (tmp_path / "page.dcm").write_bytes(b"<html><body>session expired</body></html>\n")
    assert failure(xray, tmp_path / "page.dcm", tmp_path).startswith("ValueError: not a DICOM file")


def test_dicom_with_file_meta_but_no_transfer_syntax_reads_as_it_was_encoded(xray, tmp_path):
    """Some exporters write the preamble and file meta but leave (0002,0010) out of it."""
    pixels = radiograph()
    reference = processed(xray, write_dicom_xray(tmp_path / "with.dcm", pixels), tmp_path)
    path = write_dicom_xray(tmp_path / "no_syntax.dcm", pixels)
    ds = pydicom.dcmread(path)
    del ds.file_meta.TransferSyntaxUID
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] == b"DICM" and "TransferSyntaxUID" not in pydicom.dcmread(path).file_meta
    np.testing.assert_array_equal(processed(xray, path, tmp_path), reference)


def test_malformed_pixel_spacing_is_named(xray, tmp_path):
    path = edit_dicom(write_dicom_xray(tmp_path / "view.dcm", radiograph()), PixelSpacing="0.2")
    assert "PixelSpacing has 1 values, expected 2" in failure(xray, path, tmp_path)


def _scene(row_spacing: float, column_spacing: float, size_mm: float = 12.0) -> np.ndarray:
    """A smooth 12-bit scene of ``size_mm`` square, sampled at the given pixel spacings (mm)."""
    rows = np.arange(round(size_mm / row_spacing)) * row_spacing + row_spacing / 2
    columns = np.arange(round(size_mm / column_spacing)) * column_spacing + column_spacing / 2
    y, x = np.meshgrid(rows, columns, indexing="ij")
    scene = np.exp(-((y - 4.0) ** 2 + (x - 7.0) ** 2) / 4.0) + x / 24.0
    return np.round(scene / scene.max() * 4095).astype(np.uint16)


def test_non_square_pixels_keep_the_anatomy_s_aspect(xray, tmp_path):
    square = write_dicom_xray(tmp_path / "square.dcm", _scene(0.2, 0.2))
    oblong = edit_dicom(write_dicom_xray(tmp_path / "oblong.dcm", _scene(0.3, 0.2)), PixelSpacing=[0.3, 0.2])
    reference, result = processed(xray, square, tmp_path / "a"), processed(xray, oblong, tmp_path / "b")
    # before: resized by its 60 columns, the 40 rows came out 21 of 32, squashed, above black padding
    assert (result > 0).mean(axis=1).min() > 0.9
    np.testing.assert_allclose(result / 65535, reference / 65535, atol=0.03)


def test_exif_orientation_is_applied(xray, tmp_path):
    pixels = radiograph()
    upright = processed(xray, write_png(tmp_path / "upright.png", pixels, "L"), tmp_path)
    # Stored turned a quarter to the left, with the EXIF tag that tells viewers to turn it back.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(np.rot90((pixels // 16).astype(np.uint8))).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    turned = processed(xray, tmp_path / "turned.jpg", tmp_path)
    assert np.corrcoef(turned.ravel(), upright.ravel())[0, 1] > 0.99


@pytest.mark.parametrize(
    "syntax", ["JPEGLosslessProcess14_1", "JPEGLSLossless"], ids=["jpeg-lossless", "jpeg-ls"]
)
def test_dicom_compressed_as_pacs_export_it_reads_like_the_uncompressed_file(xray, tmp_path, syntax):
    plain = write_dicom_xray(tmp_path / "plain.dcm", radiograph())
    compressed = gdcm_compressed(plain, tmp_path / "compressed.dcm", getattr(gdcm.TransferSyntax, syntax))
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(processed(xray, compressed, tmp_path / "a"), processed(xray, plain, tmp_path / "b"))


@pytest.mark.skipif(get_decoder(HTJ2KLossless).is_available, reason="an HTJ2K decoder is installed")
def test_undecodable_dicom_fails_alone_naming_syntax_and_packages(tmp_path):
    raw = tmp_path / "raw"
    view = lambda patient: raw / "train" / f"patient{patient}" / "study1" / "view1_frontal.dcm"  # noqa: E731
    sources = [
        ("patient00001", htj2k_dicom(view("00001"))),
        ("patient00002", colour_dicom(view("00002"), (radiograph() // 16).astype(np.uint8))),
        ("patient00003", without_preamble(write_dicom_xray(view("00003"), radiograph()))),
    ]
    records = pd.DataFrame(
        {"source_id": [s for s, _ in sources], "image": [str(p) for _, p in sources], "sex": "female",
         "cohort": "chexpert_plus"}
    )
    out = tmp_path / "out"
    config = load_pipeline_config(XRAY_CONFIG, SMALL_XRAY)
    summary = preprocess_records(
        records, pd.DataFrame(columns=["source_id", "image", "reason", "cohort"]), config, raw, out,
        Pseudonymiser(KEY), progress=False,
    )
    assert (summary.done, summary.failed) == (2, 1)
    errors = pd.read_csv(out / "errors.csv")
    assert errors["subject_id"].tolist() == [Pseudonymiser(KEY).subject("chexpert_plus", "patient00001")]
    reason = errors["reason"].item()
    assert "High-Throughput JPEG 2000" in reason and "1.2.840.10008.1.2.4.201" in reason
    assert "pylibjpeg-openjpeg" in reason
    for path in out.rglob("*"):
        if path.is_file():
            for identifier in PLANTED:
                assert identifier.encode() not in searchable_bytes(path), (path, identifier)


def test_a_four_dimensional_nifti_says_to_extract_one_volume(brain, tmp_path):
    volume = np.stack([head_volume(1), head_volume(2)], axis=-1)  # e.g. two echoes in one file
    reason = failure(brain, write_nifti(tmp_path / "T1.nii.gz", volume), tmp_path)
    assert "channel-first shape (2," in reason and "extract the one to use" in reason


def test_a_volume_stored_with_singleton_time_and_echo_axes_reads_as_the_volume(brain, tmp_path):
    # (X, Y, Z, 1, 1): dim[0] = 5, as some converters write a single volume
    volume = head_volume(1)
    reference = processed(brain, write_nifti(tmp_path / "3d" / "T1.nii.gz", volume), tmp_path / "a")
    five = processed(brain, write_nifti(tmp_path / "5d" / "T1.nii.gz", volume[..., None, None]), tmp_path / "b")
    np.testing.assert_array_equal(five, reference)


def test_loading_sends_no_one_after_the_gpu_dicom_decoder_it_does_not_use(caplog, recwarn):
    PreprocessPipeline(load_pipeline_config(XRAY_CONFIG, SMALL_XRAY))
    messages = [record.getMessage() for record in caplog.records] + [str(warning.message) for warning in recwarn]
    assert not [message for message in messages if "nvImageCodec" in message]


def test_a_reason_keeps_the_later_lines_of_a_library_error():
    error = RuntimeError("Unable to decompress the pixel data\n  plugin 'pylibjpeg': requires pylibjpeg-libjpeg\n")
    assert describe_error(error) == (
        "RuntimeError: Unable to decompress the pixel data plugin 'pylibjpeg': requires pylibjpeg-libjpeg"
    )


def test_a_plain_nifti_named_gz_and_a_complex_or_colour_nifti_are_named(brain, tmp_path):
    plain = write_nifti(tmp_path / "plain.nii", head_volume(1))
    misnamed = tmp_path / "misnamed.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    assert "is named .gz but is not gzip-compressed" in failure(brain, misnamed, tmp_path)
    # before: the imaginary part was dropped with only a warning, and the image went through
    complex_path = write_nifti(tmp_path / "complex.nii.gz", head_volume(1).astype(np.complex64))
    assert "NIfTI holds complex voxels (complex64)" in failure(brain, complex_path, tmp_path)
    grey = (head_volume(1) * 100).clip(0, 255).astype(np.uint8)
    colour = np.empty(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    colour["R"] = colour["G"] = colour["B"] = grey
    # before: NumPy's bare "Cannot cast array data from dtype([('R', 'u1'), ...])" TypeError
    colour_path = write_nifti(tmp_path / "colour.nii.gz", colour)
    assert "NIfTI holds colour voxels (RGB24)" in failure(brain, colour_path, tmp_path)


def test_a_cut_off_nifti_a_non_nifti_and_a_dicom_named_jpg_are_named_with_the_fix(brain, xray, tmp_path):
    whole = write_nifti(tmp_path / "whole.nii.gz", head_volume(1)).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])  # before: a bare EOFError
    assert "cut.nii.gz is truncated or corrupt (EOFError" in failure(brain, tmp_path / "cut.nii.gz", tmp_path)
    (tmp_path / "brain.nii.gz").write_bytes(gzip.compress(b"\x00\x00\x00\x01" + bytes(400)))  # e.g. a .mgz, renamed
    assert "brain.nii.gz is not a NIfTI file" in failure(brain, tmp_path / "brain.nii.gz", tmp_path)
    dicom = write_dicom_xray(tmp_path / "view.dcm", radiograph())
    (tmp_path / "view.jpg").write_bytes(dicom.read_bytes())  # before: PIL's "cannot identify image file"
    assert "if it is DICOM, name it .dcm" in failure(xray, tmp_path / "view.jpg", tmp_path)


def test_blank_display_attributes_are_taken_as_absent_and_a_window_of_no_width_is_ignored(xray, tmp_path):
    # Anonymizers and exports blank attributes rather than delete them.
    pixels = radiograph()
    reference = processed(xray, write_dicom_xray(tmp_path / "plain.dcm", pixels), tmp_path / "a")
    blank = write_dicom_xray(tmp_path / "blank.dcm", pixels, window=(2048, 4096))
    edit_dicom(blank, RescaleSlope=None, RescaleIntercept=None, WindowCenter=None, WindowWidth=None)
    np.testing.assert_array_equal(processed(xray, blank, tmp_path / "b"), reference)
    no_width = write_dicom_xray(tmp_path / "no_width.dcm", pixels, window=(2048, 0))
    np.testing.assert_array_equal(processed(xray, no_width, tmp_path / "c"), reference)
    imager = edit_dicom(write_dicom_xray(tmp_path / "imager.dcm", pixels), PixelSpacing=None, ImagerPixelSpacing=[0.2, 0.2])
    np.testing.assert_array_equal(processed(xray, imager, tmp_path / "d"), reference)


def test_compressed_pixels_that_cannot_be_decoded_say_how_to_get_them_read(xray, tmp_path):
    plain = write_dicom_xray(tmp_path / "plain.dcm", radiograph())
    path = gdcm_compressed(plain, tmp_path / "cut.dcm", gdcm.TransferSyntax.JPEGLSLossless)
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) * 9 // 10]])  # cut off in copying
    ds.save_as(path)
    reason = failure(xray, path, tmp_path)
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80) could not be decoded" in reason
    assert "copy it again" in reason and "export it again uncompressed" in reason


def _flipped_sform_pair(folder: Path, volume: np.ndarray, image_class: type) -> Path:
    """``volume`` in a NIfTI file (or pair) whose sform flips x against its qform, as after some registrations."""
    qform, sform = np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([-2.0, 2.0, 2.0, 1.0])
    image = image_class(volume, qform)
    image.set_qform(qform, code="scanner")
    image.set_sform(sform, code="aligned")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("T1.hdr" if image_class is nib.Nifti1Pair else "T1.nii.gz")
    nib.save(image, path)
    return path


def test_a_nifti_pair_is_placed_as_the_same_header_in_one_file_and_analyze_is_refused(brain, tmp_path):
    # ITK, which took .hdr/.img, places an image by its qform; nibabel by its sform
    volume = head_volume(1)
    volume[16:, 16:, 16:] *= 0.5  # so that a flip would show
    single = processed(brain, _flipped_sform_pair(tmp_path / "single", volume, nib.Nifti1Image), tmp_path / "a")
    pair = processed(brain, _flipped_sform_pair(tmp_path / "pair", volume, nib.Nifti1Pair), tmp_path / "b")
    np.testing.assert_array_equal(pair, single)
    nib.save(nib.AnalyzeImage(volume, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "analyze.hdr")
    assert "ANALYZE 7.5 header records no orientation" in failure(brain, tmp_path / "analyze.hdr", tmp_path)


def test_itk_prints_no_path_that_holds_a_subject_id(tmp_path, capfd):
    # ITK's C++ warnings go to stderr with the raw path, e.g. "<eid>_20252_2_0/T1/T1.hdr has unexpected scales in sform"
    qform = np.diag([2.0, 2.0, 2.0, 1.0])
    sheared = qform.copy()
    sheared[0, 1] = 0.5
    image = nib.Nifti1Pair(head_volume(1), qform)
    image.set_qform(qform, code="scanner")
    image.set_sform(sheared, code="aligned")
    path = tmp_path / "1234567_20252_2_0" / "T1.hdr"
    path.parent.mkdir()
    nib.save(image, path)
    LoadImageBySuffixd("image", [ITKReader()])({"image": path})
    assert "1234567" not in capfd.readouterr().err
