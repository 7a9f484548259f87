"""Image loading for the preprocessing pipelines: one reader per file, DICOM radiographs, greyscale PIL images."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from monai.config import DtypeLike, KeysCollection, PathLike
from monai.data import ImageReader, MetaTensor
from monai.transforms import LoadImage, MapTransform
from monai.utils import ensure_tuple
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

DICOM_SUFFIXES = (".dcm", ".dicom")


class LoadImageBySuffixd(MapTransform):
    """Load each image with the first of ``readers`` that accepts its suffix, and with no other.

    ``LoadImaged`` tries every registered reader in turn when one fails, and some read broken files
    without complaint: ITK returns a truncated ``.nii.gz`` as a volume, the missing part zero. One reader
    per suffix lets a broken file fail with its reader's own error.

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
    >>> from monai.data import ITKReader, NibabelReader
    >>> load = LoadImageBySuffixd("image", [NibabelReader(), ITKReader()])  # NIfTI, else a DICOM series
    >>> load({"image": "T1.nii.gz"})["image"].shape
    """

    def __init__(
        self, keys: KeysCollection, readers: Sequence[ImageReader], dtype: DtypeLike = np.float32
    ) -> None:
        super().__init__(keys)
        self.readers = list(readers)
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
            d[key] = self._loader(d[key], self.reader_for(d[key]))
        return d


def _single_file(data: Sequence[PathLike] | PathLike) -> Path:
    files = ensure_tuple(data)
    if len(files) != 1:
        raise ValueError(f"expected one radiograph file, got {len(files)}: stack channels before reading")
    return Path(files[0])


class DicomXrayReader(ImageReader):
    """Read a single-frame DICOM radiograph as display intensities, bright = dense.

    Applies what a viewer would: the modality LUT (or rescale slope / intercept), then the VOI LUT
    or window, and inverts ``MONOCHROME1`` images so that bone is bright in every output. The
    array is indexed ``[column, row]`` like MONAI's ``PILReader`` (``reverse_indexing=True``), so
    DICOM and PNG inputs of the same radiograph end up identical.

    Only geometry (pixel spacing) and the view position reach the metadata: patient and study
    tags never leave this reader, so no writer can copy them into an output by accident.

    Examples
    --------
    >>> from monai.transforms import LoadImage
    >>> image = LoadImage(reader=DicomXrayReader(), image_only=True)("view1_frontal.dcm")
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(str(name).lower().endswith(DICOM_SUFFIXES) for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> pydicom.Dataset:
        return pydicom.dcmread(_single_file(data), **kwargs)

    def get_data(self, img: pydicom.Dataset) -> tuple[np.ndarray, dict]:
        if "PixelData" not in img:
            raise ValueError("DICOM file has no pixel data (tag PixelData (7FE0,0010) missing)")
        photometric = str(img.get("PhotometricInterpretation", ""))
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(
                f"expected a greyscale radiograph (MONOCHROME1/2), got PhotometricInterpretation {photometric!r}"
            )
        stored = img.pixel_array
        if stored.ndim != 2:
            raise ValueError(f"expected a single-frame 2D radiograph, got pixel array of shape {stored.shape}")
        display = apply_voi_lut(apply_modality_lut(stored, img), img).astype(np.float32)
        if photometric == "MONOCHROME1":
            # Mirror within the image's own range; the intensity scaling that follows is
            # shift-invariant, so this equals inverting within the nominal bit range.
            display = display.max() + display.min() - display
        spacing = img.get("PixelSpacing", img.get("ImagerPixelSpacing", (1.0, 1.0)))
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


def pil_to_greyscale(image: Image.Image) -> Image.Image:
    """Convert colour PIL images to 8-bit luminance; keep greyscale images at their bit depth.

    Used as ``PILReader(converter=...)``: ``image.convert("L")`` would also squash 16-bit PNGs to 8 bit.
    """
    if image.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        return image
    return image.convert("L")
