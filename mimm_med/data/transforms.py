"""Dictionary transforms the preprocessing pipelines need beyond MONAI's own."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import Compose, MapTransform, Spacing
from monai.utils import convert_to_dst_type, convert_to_numpy
from skimage.exposure import equalize_adapthist
from skimage.filters import threshold_otsu


def above_otsu(image: NdarrayOrTensor) -> NdarrayOrTensor:
    """Foreground mask ``image > Otsu threshold``, a ``select_fn`` for ``CropForegroundd``.

    Otsu separates air from head on a T1 whatever the scanner's intensity scale, background noise
    or bias field, where a fixed ``> 0`` keeps every noisy background voxel.
    """
    return image > threshold_otsu(convert_to_numpy(image, dtype=np.float32))


class ValidateImaged(MapTransform):
    """Reject images a pipeline cannot process correctly, with the reason as the error message.

    Parameters
    ----------
    keys
        Keys of channel-first images to check.
    spatial_dims
        Required number of spatial dimensions (3 for MRI volumes, 2 for radiographs).
    channels
        Required number of channels.
    spatial_size
        Required spatial shape, where nothing resizes the image after the check (``None``: any).
    min_extent
        Fewest voxels along every spatial axis: a single slice or a tiny block, as a mis-converted
        series gives, would be resampled and padded into an output that is nearly all padding.
    name_file
        Start each message with the image's file (``filename_or_obj`` of a loaded ``MetaTensor``): for
        training and evaluation, whose errors name no file otherwise. Preprocessing records the file
        itself, as a pseudonym, and must not write the raw path.

    Raises
    ------
    ValueError
        On a wrong number of dimensions, channels or spatial size, fewer than ``min_extent`` voxels
        along an axis, an empty or blank image, or NaN / infinite values.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        channels: int = 1,
        spatial_size: Sequence[int] | None = None,
        name_file: bool = False,
        min_extent: int = 2,
    ) -> None:
        super().__init__(keys)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.spatial_size = None if spatial_size is None else tuple(int(edge) for edge in spatial_size)
        self.min_extent = min_extent
        self.name_file = name_file

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                self._check(d[key])
            except ValueError as error:
                source = getattr(d[key], "meta", {}).get("filename_or_obj") if self.name_file else None
                if source is None:
                    raise
                raise ValueError(f"{source}: {error}") from None
        return d

    def _check(self, loaded: NdarrayOrTensor) -> None:
        # NumPy: an order of magnitude faster than torch.isfinite on a MetaTensor here.
        image = convert_to_numpy(loaded)
        expected = f"a {self.channels}-channel {self.spatial_dims}D image"
        if image.ndim != self.spatial_dims + 1 or image.shape[0] != self.channels:
            # a 4-D NIfTI (a time series, or several echoes) arrives with its volumes as channels
            several = " (several volumes or channels: extract the one to use, e.g. with fslroi)" if image.shape[0] > 1 else ""
            raise ValueError(f"expected {expected}, got channel-first shape {image.shape}{several}")
        if image.size == 0:
            raise ValueError(f"expected {expected}, got an empty array of shape {image.shape}")
        if min(image.shape[1:]) < self.min_extent:
            raise ValueError(
                f"expected {expected} of at least {self.min_extent} voxels along each axis, got spatial shape "
                f"{image.shape[1:]}: a single slice or a fragment, as a conversion that lost part of the scan "
                "leaves; convert it again from the original"
            )
        if self.spatial_size is not None and image.shape[1:] != self.spatial_size:
            raise ValueError(
                f"expected the spatial size {self.spatial_size} the network takes, got {image.shape[1:]}: give images "
                "of that size (the preprocessing of this cohort writes them)"
            )
        finite = np.isfinite(image)
        if not finite.all():
            raise ValueError(
                f"{int(image.size - finite.sum())} of {image.size} values are NaN or infinite: give the unmasked "
                "image, or set them to 0 first (e.g. fslmaths in -nan out: masked FSL and SPM outputs hold NaN "
                "outside the brain); a preprocessed image holding them is corrupt, so preprocess it again"
            )
        if image.min() == image.max():
            raise ValueError(f"the image is blank: every value is {image.flat[0]}")


class ScalePercentilesd(MapTransform):
    """Map each image's ``lower`` and ``upper`` intensity percentiles to 0 and 1, clipping outside.

    The result of MONAI's ``ScaleIntensityRangePercentilesd(lower, upper, 0, 1, clip=True)``, with
    the percentiles from NumPy's linear-time selection: below a million voxels MONAI sorts with
    ``torch.quantile``, about 7× slower on a 96³ volume, a third of the brain pipeline's time.

    Raises
    ------
    ValueError
        If both percentiles are equal: there is nothing to scale.
    """

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5) -> None:
        super().__init__(keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"expected 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        self.lower = lower
        self.upper = upper

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            low, high = np.percentile(convert_to_numpy(d[key]), [self.lower, self.upper])
            if high <= low:
                raise ValueError(
                    f"the {self.lower}th and {self.upper}th intensity percentiles are both {low}: nothing to scale"
                )
            d[key] = ((d[key] - low) / (high - low)).clip(0.0, 1.0)
        return d


class RequireViewd(MapTransform):
    """Reject radiographs whose recorded view position is not one of ``views``.

    Cards select frontal views from the metadata table; this is the second line of defence for
    DICOMs, whose ``ViewPosition`` the reader records as ``meta["view_position"]``. Images that
    record no view (PNG, JPG) pass.
    """

    def __init__(self, keys: KeysCollection, views: Sequence[str] = ("PA", "AP")) -> None:
        super().__init__(keys)
        self.views = tuple(v.upper() for v in views)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            view = d[key].meta.get("view_position", "") if isinstance(d[key], MetaTensor) else ""
            if view and view not in self.views:
                raise ValueError(f"view position {view!r} is not one of {list(self.views)}; only these views are used")
        return d


class SquarePixelsd(MapTransform):
    """Resample images whose pixels are not square to square pixels of their finest spacing.

    Resizing to a fixed grid keeps the aspect of the pixel array, which is the anatomy's only when
    the pixels are square: a radiograph digitized at 0.1 × 0.15 mm would come out squashed by a
    third. The spacing is read from the image's affine (``DicomXrayReader`` records ``PixelSpacing``
    there); images without one (PNG, JPG) have square pixels and pass unchanged.

    Parameters
    ----------
    keys
        Keys of channel-first ``MetaTensor`` images.
    rtol
        Relative difference of the spacings below which pixels count as square (decimal strings in
        headers differ in their last digits).
    mode
        Interpolation of MONAI's ``Spacing``.
    """

    def __init__(self, keys: KeysCollection, rtol: float = 1e-3, mode: str = "bilinear") -> None:
        super().__init__(keys)
        self.rtol = rtol
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            spacing = np.asarray(d[key].pixdim, dtype=float)
            finest = float(spacing.min())
            if np.ptp(spacing) > self.rtol * finest:
                d[key] = Spacing(pixdim=[finest] * len(spacing), mode=self.mode)(d[key])
        return d


class CLAHEd(MapTransform):
    """Contrast-limited adaptive histogram equalisation (``skimage.exposure.equalize_adapthist``).

    Expects intensities in ``[0, 1]``; equalises every channel of a 2D image separately.

    Parameters
    ----------
    keys
        Keys of channel-first 2D images.
    clip_limit
        Contrast limit in ``(0, 1]``; higher values give more contrast (and more noise).
    kernel_size
        Size of the contextual regions; ``None`` is 1/8 of each image side.
    """

    def __init__(
        self, keys: KeysCollection, clip_limit: float = 0.01, kernel_size: int | Sequence[int] | None = None
    ) -> None:
        super().__init__(keys)
        self.clip_limit = clip_limit
        self.kernel_size = kernel_size

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = convert_to_numpy(d[key], dtype=np.float64).clip(0.0, 1.0)
            equalised = np.stack(
                [equalize_adapthist(c, kernel_size=self.kernel_size, clip_limit=self.clip_limit) for c in image]
            )
            d[key] = convert_to_dst_type(equalised.astype(np.float32), d[key])[0]
        return d


class UntrackedCompose(Compose):
    """:class:`monai.transforms.Compose` that runs with MONAI's metadata tracking switched off.

    For in-memory arrays whose metadata nothing reads (the Digits-Morpho records): on a 28×28 image,
    building and updating the ``MetaTensor`` of a random affine costs as much as the warp itself. The
    global setting is restored after every call, so loaders elsewhere in the process keep their
    metadata. The outputs are plain tensors.

    Examples
    --------
    >>> from monai.transforms import RandAffined
    >>> augment = UntrackedCompose([RandAffined("image", prob=1.0, translate_range=(2, 2))])
    >>> type(augment({"image": np.zeros((1, 8, 8), np.float32)})["image"]).__name__
    'Tensor'
    """

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        """Apply the transforms as :meth:`monai.transforms.Compose.__call__` does."""
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, *args, **kwargs)
        finally:
            set_track_meta(tracking)
