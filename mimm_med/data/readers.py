"""Image loading for the preprocessing pipelines: one reader per file, checked DICOM series, DICOM radiographs,
greyscale PIL images."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from monai.config import DtypeLike, KeysCollection, PathLike
from monai.data import ImageReader, ITKReader, MetaTensor, NibabelReader
from monai.data.utils import is_supported_format
from monai.transforms import LoadImage, MapTransform
from monai.utils import ensure_tuple, optional_import
from nibabel.filebasedimages import ImageFileError
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mimm_med.data.notices import quiet_gpu_decoder_notices, quiet_itk_warnings

itk, _ = optional_import("itk", allow_namespace_pkg=True)

DICOM_SUFFIXES = (".dcm", ".dicom")
#: Largest deviation of a slice gap from the series' median gap, relative to it: positions are decimal
#: strings of a few digits, while a missing slice doubles a gap.
SLICE_SPACING_RTOL = 0.01
_NAMES_SHOWN = 3
#: NIfTI ``datatype`` codes of complex voxels.
NIFTI_COMPLEX_TYPES: dict[int, str] = {32: "complex64", 1792: "complex128", 2048: "complex256"}
#: NIfTI ``datatype`` codes of colour voxels.
NIFTI_COLOUR_TYPES: dict[int, str] = {128: "RGB24", 2304: "RGBA32"}
#: Colour encodings of radiographs exported as secondary captures; pydicom decodes all of them as RGB.
COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
#: Attributes of a radiograph's geometry and display that a blank value must not break (taken as absent).
BLANKABLE_ATTRIBUTES = (
    "PixelSpacing", "ImagerPixelSpacing", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTSequence", "VOILUTFunction",
)  # fmt: skip


class LoadImageBySuffixd(MapTransform):
    """Load each image with the first of ``readers`` that accepts its suffix, and with no other.

    ``LoadImaged`` tries every registered reader in turn when one fails, and some read broken files
    without complaint: ITK returns a truncated ``.nii.gz`` as a volume, the missing part zero. One reader
    per suffix lets a broken file fail with its reader's own error. A folder is a DICOM series and is
    checked with :func:`check_dicom_series` first: ITK skips unreadable slices with only a warning.

    Parameters
    ----------
    keys
        Keys of file paths (or DICOM series folders) to replace with ``MetaTensor`` images.
    readers
        Candidate readers, most specific first: a reader accepting anything (``ITKReader``) goes last.
    dtype
        Data type of the loaded arrays.

    Examples
    --------
    >>> import tempfile
    >>> import nibabel as nib
    >>> from monai.data import ITKReader, NibabelReader
    >>> path = Path(tempfile.mkdtemp()) / "T1.nii.gz"
    >>> nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.float32), np.eye(4)), path)
    >>> load = LoadImageBySuffixd("image", [NibabelReader(), ITKReader()])  # NIfTI, else a DICOM series
    >>> load({"image": path})["image"].shape
    torch.Size([8, 8, 6])
    >>> type(load.reader_for(path)).__name__, type(load.reader_for(path.parent)).__name__
    ('NibabelReader', 'ITKReader')
    """

    def __init__(
        self, keys: KeysCollection, readers: Sequence[ImageReader], dtype: DtypeLike = np.float32
    ) -> None:
        super().__init__(keys)
        self.readers = list(readers)
        quiet_gpu_decoder_notices()  # LoadImage registers that decoder whatever readers it is given
        self._loader = LoadImage(image_only=True, dtype=dtype)

    def reader_for(self, path: PathLike) -> ImageReader:
        """The reader that ``path`` is loaded with."""
        for reader in self.readers:
            if reader.verify_suffix(path):
                return reader
        names = [type(r).__name__ for r in self.readers]
        raise ValueError(f"none of the pipeline's readers {names} reads {Path(path).name}: convert it or add a reader")

    def __call__(self, data: Mapping[Hashable, PathLike]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            reader = self.reader_for(d[key])
            if isinstance(reader, ITKReader):
                quiet_itk_warnings()
            if Path(d[key]).is_dir():
                # ITKReader reads the series it is given by name, else the folder's first one.
                check_dicom_series(d[key], getattr(reader, "series_name", ""))
            try:
                d[key] = self._loader(d[key], reader)
            except (ImageFileError, EOFError, zlib.error, UnidentifiedImageError) as error:
                raise ValueError(_unreadable(Path(d[key]), error)) from None
            check_nifti_header(d[key])
        return d


class NiftiReader(NibabelReader):
    """MONAI's ``NibabelReader`` that also takes NIfTI-1 pairs and ANALYZE files (``.hdr`` / ``.img``).

    MONAI's reader takes ``.nii`` and ``.nii.gz`` only, which would leave pairs to ``ITKReader``: ITK
    places an image by its qform where nibabel uses the sform, so one header would be oriented two
    ways by its file's suffix. ANALYZE files, which record no orientation, are refused by
    :func:`check_nifti_header`.
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return super().verify_suffix(filename) or is_supported_format(filename, ["hdr", "img"])

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """The voxels and metadata of ``img``; colour voxels, which NumPy cannot cast to a scalar type, are refused."""
        for each in ensure_tuple(img):
            datatype = int(each.header.get("datatype", 0))
            if datatype in NIFTI_COLOUR_TYPES:
                raise ValueError(
                    f"NIfTI holds colour voxels ({NIFTI_COLOUR_TYPES[datatype]}), not an MRI intensity: convert it "
                    "to one greyscale channel (e.g. fslmaths, or from the DICOMs again with dcm2niix)"
                )
        return super().get_data(img)


def _unreadable(path: Path, error: Exception) -> str:
    """Why ``path`` could not be read and what to do, for the readers' errors that say neither."""
    if isinstance(error, UnidentifiedImageError):
        return (
            f"{path.name} is in no image format PIL reads, though named {path.suffix}: if it is DICOM, name it .dcm "
            "(and the cohort card's image pattern); else export it again as PNG"
        )
    if isinstance(error, (EOFError, zlib.error)):
        return f"{path.name} is truncated or corrupt ({type(error).__name__}: {error}): copy it again"
    if "not a gzip file" in str(error):
        return (
            f"{path.name} is named .gz but is not gzip-compressed: gzip it, or name it without .gz "
            "(and the cohort card's image pattern); if it is no NIfTI at all, copy it again"
        )
    return (
        f"{path.name} is not a NIfTI file ({error}): convert it to NIfTI (e.g. mri_convert for a FreeSurfer .mgz, "
        "dcm2niix for DICOM) or copy it again"
    )


def check_nifti_header(image: MetaTensor) -> None:
    """Refuse a NIfTI image whose header records no orientation, or complex voxels.

    With ``qform_code`` and ``sform_code`` both 0 the NIfTI standard leaves the orientation unknown
    (the ANALYZE method), as an ANALYZE 7.5 file does; nibabel then assumes a radiological (LAS)
    layout from the voxel sizes, which flips left and right of every image stored otherwise. Complex voxels would be cast to
    their real part with only a warning. Images of other formats (no such header fields) pass.

    Raises
    ------
    ValueError
        If both orientation codes are present and 0, the header is ANALYZE's, or the data type is complex.
    """
    codes = [image.meta.get(code) for code in ("qform_code", "sform_code")]
    # nibabel's ANALYZE header has the fields of every such header but no orientation codes at all
    analyze = "sizeof_hdr" in image.meta and codes == [None, None]
    if analyze or all(code is not None and int(code) == 0 for code in codes):
        header = "ANALYZE 7.5 header records no orientation" if analyze else "NIfTI header has qform_code and sform_code 0"
        raise ValueError(
            f"{header}: the image's orientation is unknown and left/right "
            "could be swapped; convert it again from the DICOMs (e.g. with dcm2niix) or set its qform/sform"
        )
    datatype = image.meta.get("datatype")
    if datatype is not None and int(datatype) in NIFTI_COMPLEX_TYPES:
        raise ValueError(
            f"NIfTI holds complex voxels ({NIFTI_COMPLEX_TYPES[int(datatype)]}), whose imaginary part would be "
            "dropped: save the magnitude image (e.g. fslcomplex -realabs) and preprocess that"
        )


def _gdcm_series(folder: PathLike) -> dict[str, list[Path]]:
    """The files of each DICOM series in ``folder``, sorted by slice position, as ``ITKReader`` finds them."""
    names = itk.GDCMSeriesFileNames.New()
    # The settings of ITKReader.read, so that the series checked are the series read.
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # Series Date
    names.SetDirectory(str(folder))
    return {uid: [Path(f) for f in names.GetFileNames(uid)] for uid in names.GetSeriesUIDs()}


def _ranks(chosen: Sequence[Path], among: Sequence[Path]) -> str:
    """Where ``chosen`` files stand among ``among`` sorted by name, e.g. ``"files 3, 7 of the 20 sorted by name"``.

    DICOM slice files are often named by their SOP Instance UID, or by the patient's name (Siemens
    exports), so errors.csv names them by rank rather than by name.
    """
    names = sorted(f.name for f in among)
    ranks = sorted(names.index(f.name) + 1 for f in chosen)
    shown = ", ".join(str(rank) for rank in ranks[:_NAMES_SHOWN]) + (", ..." if len(ranks) > _NAMES_SHOWN else "")
    return f"file{'s' if len(ranks) > 1 else ''} {shown} of the {len(names)} sorted by name"


def check_dicom_series(folder: PathLike, series_name: str = "") -> None:
    """Check that a folder's DICOM series reads completely and has uniformly spaced slices.

    ITK skips a slice file that it cannot parse (a truncated one, say) with only a warning on stderr
    and builds a volume with the wrong geometry from the rest. Here every file of ``folder`` that is
    DICOM (has the ``DICM`` preamble) must be a slice of a series ITK finds, and the read series'
    slice positions (``ImagePositionPatient`` projected on the slice normal) must be uniformly
    spaced, which a slice file missing from the middle breaks. Only headers are read.

    Parameters
    ----------
    folder
        Folder of one series' slice files.
    series_name
        Series that ``ITKReader(series_name=...)`` reads; other series may then share the folder.

    Raises
    ------
    ValueError
        If a DICOM file is no slice of any series, the folder holds several series and none is named,
        or the slices are missing a position or are not uniformly spaced.
    """
    series = _gdcm_series(folder)
    in_series = {f.name for files in series.values() for f in files}
    present = [f for f in Path(folder).iterdir() if f.is_file()]
    # DICOMDIR indexes the media's files and is no slice.
    unread = [f for f in present if f.name not in in_series and f.name != "DICOMDIR" and is_dicom(f)]
    if unread:
        raise ValueError(
            f"DICOM series {folder}: {len(unread)} of {len(unread) + len(in_series)} files could not be read as "
            f"slices of the series ({_ranks(unread, present)}); re-export the series"
        )
    if not series:
        return  # no DICOM file at all: ITKReader raises its own error
    if not series_name and len(series) > 1:
        raise ValueError(
            f"DICOM series {folder}: the folder holds {len(series)} series; "
            "move each series into its own folder or name one with ITKReader(series_name=...)"
        )
    if series_name and series_name not in series:
        # Not listed: the names are series UIDs with the series date, identifiers that errors.csv must not hold.
        raise ValueError(
            f"DICOM series {folder}: no series {series_name!r} among its {len(series)}; the names are series UIDs "
            "with the series date appended, as ITK's GDCMSeriesFileNames lists them"
        )
    files = series[series_name or next(iter(series))]
    if len(files) > 1:  # a single file is a 2D image or a multi-frame volume, placed by its own header
        _check_slice_spacing(folder, files)


def _check_slice_spacing(folder: PathLike, files: Sequence[Path]) -> None:
    positions = []
    for f in files:
        header = pydicom.dcmread(
            f, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient"]
        )
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            raise ValueError(
                f"DICOM series {folder}: a slice ({_ranks([f], files)}) has no ImagePositionPatient or "
                "ImageOrientationPatient, so the slices cannot be placed; re-export the series"
            )
        orientation = np.asarray(header.ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        positions.append(float(np.dot(np.asarray(header.ImagePositionPatient, dtype=float), normal)))
    order = np.argsort(positions)
    gaps = np.diff(np.asarray(positions)[order])
    spacing = float(np.median(gaps))
    deviation = np.abs(gaps - spacing)
    if not spacing > 0 or deviation.max() > SLICE_SPACING_RTOL * spacing:
        worst = int(deviation.argmax())
        raise ValueError(
            f"DICOM series {folder}: slice spacing is not uniform ({gaps[worst]:.4g} mm between slices {worst + 1} "
            f"and {worst + 2} of {len(files)} in position order, at {positions[order[worst]]:.4g} and "
            f"{positions[order[worst + 1]]:.4g} mm along the slice normal; {spacing:.4g} mm elsewhere): a slice "
            "is missing or slices repeat; re-export the series"
        )


def _single_file(data: Sequence[PathLike] | PathLike) -> Path:
    files = ensure_tuple(data)
    if len(files) != 1:
        raise ValueError(f"expected one radiograph file, got {len(files)}: stack channels before reading")
    return Path(files[0])


class DicomXrayReader(ImageReader):
    """Read a single-frame DICOM radiograph as display intensities, bright = dense.

    Applies what a viewer would: the modality LUT (or rescale slope / intercept), then the VOI LUT
    or window, and inverts ``MONOCHROME1`` images so that bone is bright in every output; colour
    (RGB, YBR) images become their luminance, as PNG and JPG ones do. The
    array is indexed ``[column, row]`` like MONAI's ``PILReader`` (``reverse_indexing=True``), so
    DICOM and PNG inputs of the same radiograph end up identical.

    Only geometry (pixel spacing) and the view position reach the metadata: patient and study
    tags never leave this reader, so no writer can copy them into an output by accident.

    Examples
    --------
    A radiograph of a stand-in CheXpert Plus patient, whose DICOM header names a (made-up) patient:

    >>> import tempfile
    >>> from monai.transforms import LoadImage
    >>> from mimm_med.data.standins import generate_cohort
    >>> raw = generate_cohort("chexpert_plus", n=1, out=Path(tempfile.mkdtemp()) / "raw", resolution_mm=8, progress=False)
    >>> dicom = raw / "train" / "patient00001" / "study1" / "view1_frontal.dcm"
    >>> image = LoadImage(reader=DicomXrayReader(), image_only=True)(dicom)
    >>> image.shape
    torch.Size([44, 52])
    >>> sorted(image.meta)  # geometry and view only
    ['affine', 'filename_or_obj', 'original_affine', 'original_channel_dim', 'spatial_shape', 'view_position']
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(str(name).lower().endswith(DICOM_SUFFIXES) for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> pydicom.Dataset:
        """Read a DICOM file, also one without the 128-byte preamble and file meta (older archives) or its transfer syntax."""
        path = _single_file(data)
        try:
            img = pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            img = pydicom.dcmread(path, **{**kwargs, "force": True})
            if "Rows" not in img or "Columns" not in img:
                raise ValueError(
                    "not a DICOM file: no DICOM preamble ('DICM') and no image attributes; export it again as DICOM"
                ) from None
        # Without file meta (older archives), or with file meta that lacks it, there is no transfer syntax,
        # which pydicom needs to decode the pixels: it is the encoding the data set was just parsed with.
        img.ensure_file_meta()
        if "TransferSyntaxUID" not in img.file_meta:
            implicit, little = img.original_encoding
            syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
            img.file_meta.TransferSyntaxUID = syntax
        return img

    def get_data(self, img: pydicom.Dataset) -> tuple[np.ndarray, dict]:
        if "PixelData" not in img:
            raise ValueError(
                "DICOM file has no pixel data (tag PixelData (7FE0,0010) missing): if it was cut off in copying, "
                "copy it again; else export the image itself, not a report or presentation state"
            )
        photometric = str(img.get("PhotometricInterpretation", ""))
        if photometric not in ("MONOCHROME1", "MONOCHROME2", *COLOUR_PHOTOMETRICS):
            raise ValueError(
                f"expected a greyscale (MONOCHROME1/2) or colour (RGB/YBR) radiograph, got PhotometricInterpretation "
                f"{photometric!r}; export it again as MONOCHROME2"
            )
        _check_decoder(img)
        _drop_blank_display_attributes(img)
        stored = _decoded_pixels(img)
        if photometric in COLOUR_PHOTOMETRICS:
            if stored.ndim != 3:
                raise ValueError(f"expected a single-frame colour radiograph, got pixel array of shape {stored.shape}")
            # Luminance, as PNG and JPG colour images get it; colour images have no modality or VOI LUT.
            display = convert_color_space(stored, "RGB", "YBR_FULL")[..., 0].astype(np.float32)
        elif stored.ndim != 2:
            raise ValueError(
                f"expected a single-frame 2D radiograph, got pixel array of shape {stored.shape}: export the frame "
                "to use as a DICOM of its own"
            )
        else:
            display = apply_voi_lut(apply_modality_lut(stored, img), img).astype(np.float32)
        if photometric == "MONOCHROME1":
            # Mirror within the image's own range; the intensity scaling that follows is
            # shift-invariant, so this equals inverting within the nominal bit range.
            display = display.max() + display.min() - display
        spacing = img.get("PixelSpacing", img.get("ImagerPixelSpacing", (1.0, 1.0)))
        spacing = ensure_tuple(spacing)  # a malformed single value would not unpack
        if len(spacing) != 2:
            raise ValueError(f"PixelSpacing has {len(spacing)} values, expected 2 (row\\column); fix the header")
        row_spacing, column_spacing = (float(s) for s in spacing)
        affine = np.diag([column_spacing, row_spacing, 1.0, 1.0])
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(display.shape[::-1]),
            "original_channel_dim": "no_channel",
            "view_position": str(img.get("ViewPosition", "")).upper(),
        }
        return np.ascontiguousarray(display.T), meta


def _drop_blank_display_attributes(img: pydicom.Dataset) -> None:
    """Delete the geometry and display attributes of ``img`` that are present but blank, or a window of no width.

    Anonymizers and exports often blank attributes rather than remove them; blank, they would break
    the rescale and the spacing look-up, while absent, the defaults apply (no rescale, ImagerPixelSpacing).
    A window width below 1 is invalid (PS3.3 C.11.2.1.2) and would show nothing.
    """
    for keyword in BLANKABLE_ATTRIBUTES:
        if keyword in img and img[keyword].is_empty:
            del img[keyword]
    if "WindowWidth" in img and float(ensure_tuple(img.WindowWidth)[0]) <= 0:
        del img.WindowWidth
        img.pop("WindowCenter", None)


def _decoded_pixels(img: pydicom.Dataset) -> np.ndarray:
    """``img.pixel_array``, with an error that names the fix when compressed pixel data cannot be decoded."""
    syntax = img.file_meta.TransferSyntaxUID
    try:
        return img.pixel_array
    except Exception as error:  # each decoder plugin raises its own type
        if not syntax.is_compressed:
            raise
        # pydicom's first line says only that every plugin failed; the plugins' own reasons follow it
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        raise ValueError(
            f"pixel data compressed as {syntax.name} ({syntax}) could not be decoded ({detail}): the file is truncated "
            "or corrupt (copy it again), or the installed decoders lack this variant (12-bit JPEG needs pylibjpeg "
            "and pylibjpeg-libjpeg, GPL-3.0); else export it again uncompressed"
        ) from None


def _check_decoder(img: pydicom.Dataset) -> None:
    """Raise a one-line error naming the packages to install if no installed plugin decodes ``img``'s pixels.

    pydicom's own error spreads the missing plugins over several lines, and reports keep only the first.
    """
    syntax = img.file_meta.get("TransferSyntaxUID", "")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ValueError(
            f"pixel data in transfer syntax {syntax!r}, which pydicom cannot decode; export it again uncompressed"
        ) from None
    if not decoder.is_available:
        # pydicom names import names; the one pip package named otherwise is gdcm's.
        plugins = "; ".join(decoder.missing_dependencies).replace("requires gdcm", "requires python-gdcm")
        raise ValueError(
            f"pixel data compressed as {syntax.name} ({syntax}), which no installed decoder reads; install a pydicom "
            f"decoder plugin ({plugins}) or export it again uncompressed"
        )


def pil_to_greyscale(image: Image.Image) -> Image.Image:
    """Decode a PIL image, turn it upright by its EXIF orientation, then convert colour to 8-bit luminance;
    keep greyscale images at their bit depth.

    Used as ``PILReader(converter=...)``: ``image.convert("L")`` would also squash 16-bit PNGs to 8 bit.

    Raises
    ------
    ValueError
        If the file is truncated or its data is corrupt: PIL reads lazily and would otherwise fail
        later with a bare ``struct.error`` ("unpack_from requires a buffer ...").
    """
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        raise ValueError(
            f"truncated or not a valid {image.format or 'image'} file ({type(error).__name__}: {error}); "
            "copy or export it again"
        ) from None
    # Cameras and some exporters store pixels unrotated with an EXIF orientation that viewers apply.
    image = ImageOps.exif_transpose(image)
    if image.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        return image
    return image.convert("L")
