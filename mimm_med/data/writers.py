"""Atomic writers for preprocessed images and tables, and the predictions table of inference.

Every output is written to a hidden temporary file in its destination folder and moved into place
with ``os.replace`` (atomic on POSIX): a reader, a re-run or a crash never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from monai.config import NdarrayOrTensor
from monai.data import CSVSaver, MetaTensor
from monai.utils import convert_to_numpy
from PIL import Image

OUTPUT_FORMATS = {"nifti": ".nii.gz", "png": ".png"}


def _temporary_sibling(path: Path, owner: int | str) -> Path:
    # Same folder (os.replace must not cross file systems), same suffix (writers pick formats by it).
    return path.with_name(f".tmp-{owner}-{path.name}")


def _flush_to_disk(path: Path) -> None:
    # Renamed before its data reach the disk, a file can be listed complete yet read back empty after a
    # node crash; resumed runs would keep it.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; flush it to disk and move it onto ``path`` if the block succeeds, else delete it.

    Temporary files that a killed process left for the same ``path`` are removed first.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "manifest.csv"
    >>> with atomic_output(path) as tmp:
    ...     pd.DataFrame({"subject_id": ["sub-1"], "status": ["ok"]}).to_csv(tmp, index=False)
    >>> print(path.read_text(), end="")
    subject_id,status
    sub-1,ok
    >>> with atomic_output(path) as tmp:  # a write that fails leaves the file as it was
    ...     pd.DataFrame({"subject_id": ["sub-2"]}).to_csv(tmp, index=False)
    ...     raise OSError("No space left on device")
    Traceback (most recent call last):
    ...
    OSError: No space left on device
    >>> print(path.read_text(), end="")
    subject_id,status
    sub-1,ok
    >>> sorted(item.name for item in path.parent.iterdir())  # and no temporary file is left
    ['manifest.csv']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(_temporary_sibling(path, "*").name):
        stale.unlink(missing_ok=True)
    tmp = _temporary_sibling(path, os.getpid())
    try:
        yield tmp
        _flush_to_disk(tmp)
        os.replace(tmp, path)
    finally:
        # Also on KeyboardInterrupt: an interrupted write leaves nothing behind.
        tmp.unlink(missing_ok=True)


def completed_folder(folder: str | Path, make: Callable[[Path], object], resume: bool = False) -> Path:
    """Return ``folder``, made first by ``make(partial)`` in ``<folder>.partial`` and renamed when it returns.

    A folder that exists was completed: a step stopped midway (Ctrl-C, a kill) leaves only its
    ``.partial`` folder, which the next call clears, or hands to ``make`` again with ``resume`` (a
    step that skips what it finished, as ``mimm-med preprocess`` does), instead of a short folder
    that every later run would take as whole. Paths inside must be relative for the rename.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> def stopped(partial):
    ...     (partial / "first.txt").parent.mkdir(parents=True)
    ...     (partial / "first.txt").write_text("1")
    ...     raise KeyboardInterrupt
    >>> try:
    ...     completed_folder(root / "raw", stopped)
    ... except KeyboardInterrupt:
    ...     pass
    >>> (root / "raw").exists()
    False
    >>> def whole(partial):
    ...     partial.mkdir(parents=True, exist_ok=True)
    ...     (partial / "second.txt").write_text("2")
    >>> sorted(item.name for item in completed_folder(root / "raw", whole).iterdir())
    ['second.txt']
    """
    folder = Path(folder)
    if folder.exists():
        return folder
    partial = folder.with_name(f"{folder.name}.partial")
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    make(partial)
    os.replace(partial, folder)
    return folder


def finite_or_null(value: Any) -> Any:
    """``value`` with NumPy scalars as Python numbers and NaN / infinity as ``None``.

    JSON has no NaN: Python writes a bare ``NaN`` that jq, JavaScript and most JSON readers reject,
    while an undefined metric (AUROC of a one-class set) is common here.
    """
    if isinstance(value, Mapping):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [finite_or_null(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.generic):  # NumPy integers and booleans, which json cannot write
        return value.item()
    return value


def write_json(path: str | Path, document: Any) -> Path:
    """Write ``document`` atomically as indented JSON, NaN and infinity as ``null`` (:func:`finite_or_null`)."""
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(finite_or_null(document), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


class ImageFileWriter:
    """Write a channel-first single-channel image as NIfTI or PNG, from its array and affine only.

    No header is copied from the input, so no patient tag can travel into an output.

    Parameters
    ----------
    output_format
        ``"nifti"`` (float32 ``.nii.gz`` with the image's affine) or ``"png"`` (2D only,
        intensities in ``[0, 1]`` stored at ``bit_depth``).
    bit_depth
        8 or 16, PNG only.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> image = np.linspace(0.0, 1.0, 6 * 4, dtype=np.float32).reshape(1, 6, 4)  # channel, column, row
    >>> writer = ImageFileWriter("png", bit_depth=16)
    >>> path = writer(image, out / "images" / "sub-1" / "img-2")
    >>> path.relative_to(out).as_posix()
    'images/sub-1/img-2.png'
    >>> png = np.asarray(Image.open(path))
    >>> png.shape, png.dtype, int(png.max())  # 4 rows of 6 columns, [0, 1] stored as 0..65535
    ((4, 6), dtype('uint16'), 65535)
    """

    def __init__(self, output_format: str = "nifti", bit_depth: int = 16) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
        if bit_depth not in (8, 16):
            raise ValueError(f"PNG bit_depth must be 8 or 16, got {bit_depth}")
        self.output_format = output_format
        self.bit_depth = bit_depth

    @property
    def suffix(self) -> str:
        """File name suffix of the outputs, e.g. ``".nii.gz"``."""
        return OUTPUT_FORMATS[self.output_format]

    def __call__(self, image: NdarrayOrTensor, stem: str | Path) -> Path:
        """Write ``image`` (shape ``(1, *spatial)``) to ``stem + suffix`` and return that path."""
        array = convert_to_numpy(image, dtype=np.float32)
        if array.ndim < 3 or array.shape[0] != 1:
            raise ValueError(f"expected a channel-first single-channel image, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("the pipeline produced NaN or infinite values; refusing to write them")
        path = Path(f"{stem}{self.suffix}")
        with atomic_output(path) as tmp:
            if self.output_format == "nifti":
                self._write_nifti(array[0], self._affine(image), tmp)
            else:
                self._write_png(array[0], tmp)
        return path

    @staticmethod
    def _affine(image: NdarrayOrTensor) -> np.ndarray:
        if isinstance(image, MetaTensor):
            return convert_to_numpy(image.affine, dtype=np.float64)
        return np.eye(4)

    @staticmethod
    def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
        nifti = nib.Nifti1Image(array, affine)
        nifti.set_qform(affine, code="scanner")
        nifti.set_sform(affine, code="scanner")
        nifti.header.set_xyzt_units("mm")
        nib.save(nifti, path)

    def _write_png(self, array: np.ndarray, path: Path) -> None:
        if array.ndim != 2:
            raise ValueError(f"PNG output needs a 2D image, got spatial shape {array.shape}; use output_format nifti")
        dtype = np.uint16 if self.bit_depth == 16 else np.uint8
        scaled = np.round(array.clip(0.0, 1.0) * np.iinfo(dtype).max).astype(dtype)
        # MONAI arrays are indexed [column, row]; PNG rows come first.
        Image.fromarray(np.ascontiguousarray(scaled.T)).save(path, format="PNG")


def prediction_folder(model: str, manifest: str | Path) -> str:
    """A folder name of the predictions of ``model`` (a run name or a model URI) for ``manifest``: ``<model>/<input>``.

    ``<input>`` is the manifest's folder and name with a hash of its absolute path, so that two
    inputs (``site_a/manifest.csv``, ``site_b/manifest.csv``, or two data sets' ``splits/test-iid.csv``)
    do not overwrite each other's predictions.

    Examples
    --------
    >>> prediction_folder("models:/mimmx_brain@champion", "processed/site_a/manifest.csv")  # doctest: +ELLIPSIS
    'mimmx_brain@champion/site_a-manifest-...'
    """
    path = Path(manifest).absolute()
    digest = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:8]
    model_name = re.sub(r"[^\w@.=-]+", "-", model.removeprefix("models:/")).strip("-")
    return f"{model_name}/{path.parent.name}-{path.stem}-{digest}"


class PredictionTable(CSVSaver):
    """MONAI's ``CSVSaver`` that writes a table with a header: ``image, subject_id, p_<level>..., prediction, model``.

    Hand it to ``monai.handlers.ClassificationSaver(saver=...)``, which collects each image's class
    probabilities (gathered over the ranks under ``torch.distributed``). The file is written
    atomically, replacing an earlier one only once complete, and one line names it with the count
    of images predicted and of those skipped as unreadable.

    Parameters
    ----------
    output_dir
        Folder of the table.
    datalist
        The inference datalist (``image_path`` and ``subject_id`` of each image, e.g.
        :func:`mimm_med.data.datalist.image_datalist`): the subject ids, and the images expected.
    levels
        The primary label's levels in code order, one probability column each.
    model
        What made the predictions, in the ``model`` column of every row (which keeps it with the rows
        when they are copied or joined): a registered version (``models:/NAME/VERSION``, see
        :func:`mimm_med.tracking.pinned_model_uri`) or a checkpoint's path.
    filename
        Name of the table in ``output_dir``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        datalist: Sequence[Mapping],
        levels: Sequence[str],
        model: str,
        filename: str = "predictions.csv",
    ) -> None:
        super().__init__(output_dir, filename, overwrite=False)  # overwrite=True would delete the previous table at once
        self.path = Path(output_dir) / filename
        self.subjects = {str(item["image_path"]): item["subject_id"] for item in datalist}
        self.levels = [str(level) for level in levels]
        self.model = model

    def finalize(self) -> None:
        """Write the collected predictions and print where, with how many images were predicted and skipped."""
        cache = self.get_cache()
        probabilities = np.stack(list(cache.values()))  # ClassificationSaver hands over at least one image
        if probabilities.shape[1] != len(self.levels):
            raise ValueError(
                f"the network gives {probabilities.shape[1]} class probabilities, but the primary label has "
                f"{len(self.levels)} levels {self.levels}: give the label_levels it was trained with"
            )
        table = pd.DataFrame({"image": list(cache), "subject_id": [self.subjects[image] for image in cache]})
        table[[f"p_{level}" for level in self.levels]] = probabilities
        table["prediction"] = [self.levels[code] for code in probabilities.argmax(axis=1)]
        table["model"] = self.model
        with atomic_output(self.path) as tmp:
            table.to_csv(tmp, index=False)
        self.reset_cache()
        skipped = len(self.subjects) - len(table)
        unreadable = f"; {skipped} of {len(self.subjects)} images could not be read and were skipped (each named in a warning above)"
        print(f"infer: predictions of {len(table)} images in {self.path}{unreadable if skipped else ''}")
