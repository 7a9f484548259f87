"""Brain T1 MRI stand-in cohorts in the UK Biobank and NAKO layouts.

Every subject is a smooth random deformation of the MNI ICBM152 2009c T1 template that nilearn
ships (real anatomy, no download), with three effects whose sizes the caller sets:

- ``age``: the lateral ventricles dilate (quadratically with age) and cortical grey matter next to
  the sulci turns into CSF (linearly with age);
- ``sex``: head size, males larger;
- ``scanner``: contrast curve (gamma), bias field, noise, voxel size and field of view. UK Biobank
  and NAKO differ, and every site of a cohort deviates a little from its cohort's protocol.

Effect size 0 removes an effect from the images (labels are still drawn), 1 is the default.
Storage conventions (orientation, integer intensity range, file names) are layout, not effect:
they differ between cohorts at every effect size, as they do for real data.

The template is brain-extracted, so the stand-in volumes are too: zero outside the brain.
"""

from __future__ import annotations

import datetime
import importlib.util
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from ..writers import atomic_output

BRAIN_EFFECTS: tuple[str, ...] = ("age", "sex", "scanner")
# Voxel sizes a cohort may be generated at: 0.5 mm volumes already take 2 GB and 20 s each, and above
# 10 mm the template's grey matter no longer survives the resampling, so the cortical-thinning half
# of the age effect silently vanishes (from 12 mm) and then the ventricles can no longer be found.
BRAIN_RESOLUTION_MM: tuple[float, float] = (0.5, 10.0)

_TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_CSF_INTENSITY = 0.34  # median template T1 in the ventricles relative to white matter (measured)
_MAX_VENTRICLE_DILATION_MM = 4.0  # at age 80 and effect 1 (quadratic in age)
_MAX_CORTICAL_THINNING_MM = 1.2  # at age 80 and effect 1 (linear in age)
_SEX_LOG_SCALE = 0.02  # males exp(+0.02), females exp(-0.02): ~4 % linear, ~12 % volume apart
_HEAD_LOG_SCALE_SD = 0.03  # individual head size spread, larger than the sex difference
_DEFORMATION_SD_MM = 1.5
_ROTATION_SD_DEG = 2.0
_POSITION_SD_MM = 3.0


@dataclass(frozen=True)
class Protocol:
    """The acquisition properties that the ``scanner`` effect varies.

    ``voxel_mm`` and ``fov_mm`` are along the world axes (x = left-right, y, z); ``gamma`` is the
    exponent of the contrast curve on white-matter-normalised intensity; ``bias_sd`` the standard
    deviation of the log bias field; ``noise_sd`` the Rician noise level relative to white matter.
    """

    voxel_mm: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    gamma: float
    bias_sd: float
    noise_sd: float

    def interpolate(self, other: Protocol, weight: float) -> Protocol:
        """``self + weight * (other - self)`` field by field (weight 0 gives ``self``)."""

        def mix(a, b):
            return tuple(x + weight * (y - x) for x, y in zip(a, b)) if isinstance(a, tuple) else a + weight * (b - a)

        return Protocol(**{name: mix(getattr(self, name), getattr(other, name)) for name in self.__dataclass_fields__})

    def scaled(self, factors: Mapping[str, float]) -> Protocol:
        """Multiply fields (tuples element-wise) by ``factors[field]``."""

        def times(value, factor):
            return tuple(v * factor for v in value) if isinstance(value, tuple) else value * factor

        return replace(self, **{name: times(getattr(self, name), f) for name, f in factors.items()})


# The protocol that scanner effect 0 gives every scan: the middle of the two cohorts.
_NEUTRAL = Protocol(voxel_mm=(1.05, 1.0, 1.0), fov_mm=(194.0, 234.0, 190.0), gamma=1.0, bias_sd=0.1, noise_sd=0.03)


@dataclass(frozen=True)
class BrainLayout:
    """How one cohort stores its scans: file layout, metadata table, coding and acquisition.

    Parameters
    ----------
    kind
        Cohort kind, ``"ukb"`` or ``"nako"``.
    image_path
        Path of a subject's image below the output folder, formatted with ``id``.
    table
        File name of the metadata table.
    ages
        Inclusive integer age range at the imaging visit.
    sites
        Site code -> site name; each subject's site is drawn uniformly at random.
    protocol
        The cohort's acquisition protocol at scanner effect 1.
    orientation
        NIfTI axis codes of the stored arrays.
    white_matter_value
        Stored integer intensity of white matter.
    new_id
        Draws ``n`` unique subject ids.
    row
        Metadata row of one subject in the cohort's own columns and codings.
    """

    kind: str
    image_path: str
    table: str
    ages: tuple[int, int]
    sites: Mapping[str, str]
    protocol: Protocol
    orientation: tuple[str, str, str]
    white_matter_value: float
    new_id: Callable[[np.random.Generator, int], list[str]]
    row: Callable[[BrainSubject], dict[str, object]]


@dataclass(frozen=True)
class BrainSubject:
    """Demographics and acquisition of one stand-in subject."""

    subject_id: str
    sex: str  # "female" | "male"
    age: int
    site: str
    visit_date: datetime.date


def _ukb_ids(rng: np.random.Generator, n: int) -> list[str]:
    # UK Biobank eids are 7-digit integers, unique per application.
    return [str(e) for e in rng.choice(np.arange(1_000_000, 6_030_000), size=n, replace=False)]


def _nako_ids(rng: np.random.Generator, n: int) -> list[str]:
    # NAKO hands out 6-digit numeric participant pseudonyms per project.
    return [str(e) for e in rng.choice(np.arange(100_000, 999_999), size=n, replace=False)]


def _ukb_row(subject: BrainSubject) -> dict[str, object]:
    return {
        "eid": subject.subject_id,
        "31-0.0": {"female": 0, "male": 1}[subject.sex],
        "21003-2.0": subject.age,
        "54-2.0": subject.site,
        "53-2.0": subject.visit_date.isoformat(),
    }


def _nako_row(subject: BrainSubject) -> dict[str, object]:
    return {
        "ID": subject.subject_id,
        "basis_sex": {"male": 1, "female": 2}[subject.sex],
        "basis_age": subject.age,
        "basis_studyc": subject.site,
        "mri_scanner": f"Siemens MAGNETOM Skyra 3T {subject.site}",
        "mri_date": subject.visit_date.isoformat(),
    }


LAYOUTS: dict[str, BrainLayout] = {
    "ukb": BrainLayout(
        kind="ukb",
        image_path="{id}_20252_2_0/T1/T1.nii.gz",
        table="ukb_phenotypes.csv",
        ages=(45, 82),
        sites={"11025": "Cheadle", "11026": "Reading", "11027": "Newcastle", "11028": "Bristol"},
        protocol=Protocol(
            voxel_mm=(1.0, 1.0, 1.0), fov_mm=(192.0, 236.0, 188.0), gamma=0.8, bias_sd=0.06, noise_sd=0.02
        ),
        orientation=("L", "A", "S"),  # FSL's radiological storage
        white_matter_value=700.0,
        new_id=_ukb_ids,
        row=_ukb_row,
    ),
    "nako": BrainLayout(
        kind="nako",
        image_path="{id}/T1_MPRAGE/{id}_T1_MPRAGE.nii.gz",
        table="nako_metadata.csv",
        ages=(20, 75),
        sites={name: name for name in ("Augsburg", "Berlin", "Essen", "Mannheim", "Neubrandenburg")},
        protocol=Protocol(
            voxel_mm=(1.1, 1.0, 1.0), fov_mm=(196.0, 232.0, 192.0), gamma=1.25, bias_sd=0.15, noise_sd=0.04
        ),
        orientation=("A", "S", "L"),  # sagittal slices in acquisition order
        white_matter_value=2000.0,
        new_id=_nako_ids,
        row=_nako_row,
    ),
}


@dataclass(frozen=True)
class BrainTemplate:
    """MNI152 2009 T1 prepared for fast subject synthesis on a grid of ``spacing`` mm.

    ``t1`` is normalised to white matter = 1. ``ventricle_distance`` and ``cortex_distance`` (mm)
    hold, for the flat indices ``ventricle_shell`` / ``cortex_shell``, how far a voxel lies from
    the lateral ventricles / from the outer CSF; ``cortex_grey`` is the grey-matter fraction there.
    """

    t1: np.ndarray
    affine: np.ndarray
    spacing: float
    brain_box_mm: np.ndarray  # (2, 3) min and max world coordinates of the brain
    centre_mm: np.ndarray
    ventricle_shell: np.ndarray
    ventricle_distance: np.ndarray
    cortex_shell: np.ndarray
    cortex_distance: np.ndarray
    cortex_grey: np.ndarray


def _template_file(tissue: str) -> Path:
    # Locate nilearn's bundled data without importing nilearn (importing it costs seconds).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nilearn is required for the brain stand-ins: pip install nilearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / _TEMPLATE_FILE.format(tissue)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the brain stand-ins need the MNI152 templates shipped by nilearn")
    return path


def _largest_components(mask: np.ndarray, count: int) -> np.ndarray:
    labels, found = ndimage.label(mask)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, found + 1))
    return np.isin(labels, np.argsort(sizes)[::-1][:count] + 1)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    coords = np.nonzero(mask)
    return tuple(slice(max(c.min() - margin, 0), c.max() + margin + 1) for c in coords)


def _distance_mm(target: np.ndarray, spacing: float, within: tuple[slice, ...]) -> np.ndarray:
    """Euclidean distance (mm) to ``target``, computed only inside the box ``within`` (inf elsewhere)."""
    distance = np.full(target.shape, np.inf, dtype=np.float32)
    distance[within] = ndimage.distance_transform_edt(~target[within], sampling=spacing)
    return distance


@lru_cache(maxsize=2)
def load_template(spacing: float = 1.0) -> BrainTemplate:
    """Load the MNI152 2009 templates and derive the maps that the age effect needs.

    ``spacing`` > 1 blurs and resamples the 1 mm templates first, so low-resolution cohorts are
    fast and free of aliasing. The volumes are cropped to the brain: everything else is zero.
    """
    images = {tissue: nib.load(_template_file(tissue)) for tissue in ("t1", "gm", "wm")}
    affine = images["t1"].affine.copy()
    t1, gm, wm = (np.asarray(images[t].dataobj, dtype=np.float32) / 255.0 for t in ("t1", "gm", "wm"))
    if spacing > 1.0:
        t1, gm, wm = (
            ndimage.zoom(ndimage.gaussian_filter(v, 0.4 * spacing), 1.0 / spacing, order=1) for v in (t1, gm, wm)
        )
        affine[:3, :3] *= spacing
    crop = _bounding_box(t1 > 0.02, margin=2)
    affine[:3, 3] += affine[:3, :3] @ [s.start for s in crop]
    t1, gm, wm = t1[crop], gm[crop], wm[crop]
    brain = t1 > 0.02
    t1 = t1 / np.median(t1[wm > 0.9])
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    world = [affine[d, d] * np.arange(t1.shape[d]) + affine[d, 3] for d in range(3)]
    # The lateral ventricles: the two largest CSF components in a box around the brain centre (MNI mm).
    box = (
        (np.abs(world[0])[:, None, None] < 30)
        & ((world[1] > -50) & (world[1] < 30))[None, :, None]
        & ((world[2] > -5) & (world[2] < 35))[None, None, :]
    )
    ventricles = _largest_components((csf > 0.5) & box, 2)
    ventricle_distance = _distance_mm(ventricles, spacing, _bounding_box(ventricles, int(np.ceil(16 / spacing))))
    ventricle_shell = np.flatnonzero(brain & (ventricle_distance > 0) & (ventricle_distance < 16))
    outer_csf = ~brain | ((csf > 0.5) & ~ventricles)
    cortex_distance = _distance_mm(outer_csf, spacing, tuple(slice(None) for _ in range(3)))
    grey = gm / np.maximum(gm + wm, 1e-3)
    cortex_shell = np.flatnonzero(brain & (cortex_distance > 0) & (cortex_distance < 6) & (grey > 0.3))
    coords = np.nonzero(brain)
    return BrainTemplate(
        t1=t1.astype(np.float32),
        affine=affine,
        spacing=float(spacing),
        brain_box_mm=np.array(
            [[w[c].min() for w, c in zip(world, coords)], [w[c].max() for w, c in zip(world, coords)]]
        ),
        centre_mm=np.array([w[c].mean() for w, c in zip(world, coords)]),
        ventricle_shell=ventricle_shell,
        ventricle_distance=ventricle_distance.ravel()[ventricle_shell],
        cortex_shell=cortex_shell,
        cortex_distance=cortex_distance.ravel()[cortex_shell],
        cortex_grey=grey.ravel()[cortex_shell].astype(np.float32),
    )


def aged_template(template: BrainTemplate, ventricle_dilation_mm: float, cortical_thinning_mm: float) -> np.ndarray:
    """Template T1 with ventricles dilated and cortex thinned by the given distances (mm).

    Voxels within the distance turn into CSF, with a one-voxel partial-volume ramp.
    """
    t1 = template.t1.copy()
    flat = t1.reshape(-1)
    ramp = 1.0 / template.spacing
    for shell, distance, weight, grow in (
        (template.ventricle_shell, template.ventricle_distance, 1.0, ventricle_dilation_mm),
        (template.cortex_shell, template.cortex_distance, template.cortex_grey, cortical_thinning_mm),
    ):
        amount = np.clip((grow - distance) * ramp + 1.0, 0.0, 1.0) * weight
        flat[shell] += amount * (_CSF_INTENSITY - flat[shell])
    return t1


def _cosine_basis(n: int, k: int) -> np.ndarray:
    x = (np.arange(n) + 0.5) / n
    return np.cos(np.pi * x[:, None] * np.arange(k)[None, :]).astype(np.float32)


def _cosine_factors(
    shape: tuple[int, int, int], crop: tuple[slice, ...], rng: np.random.Generator, sd: float, order: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(fx, rest)`` of a random low-frequency cosine field: field = ``fx @ rest``.

    ``fx`` (x, k) holds the x-axis basis on ``crop``, ``rest`` (k, y, z, channels) everything else.
    Every channel has zero mean and standard deviation ``sd`` over the full ``shape``.
    """
    frequency = np.add.outer(np.add.outer(np.arange(order), np.arange(order)), np.arange(order))
    weight = np.where(frequency > 0, 1.0 / np.maximum(frequency, 1), 0.0)
    # Mean square of a product of cosines: 1/2 per non-constant factor.
    variance = (weight**2 * 0.5 ** np.count_nonzero(np.indices((order,) * 3) > 0, axis=0)).sum()
    scale = (weight * sd / np.sqrt(variance))[..., None]
    coefficients = (rng.standard_normal((order,) * 3 + (channels,)) * scale).astype(np.float32)
    bx, by, bz = (_cosine_basis(n, order)[c] for n, c in zip(shape, crop))
    return bx, np.einsum("yb,abze->ayze", by, np.einsum("zc,abce->abze", bz, coefficients))


def _expand(factors: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Sum of separable fields ``fx @ rest``, as one matrix product (the cost of a single add)."""
    fx = np.concatenate([f for f, _ in factors], axis=1)
    rest = np.concatenate([r for _, r in factors], axis=0)
    return (fx @ rest.reshape(len(rest), -1)).reshape((len(fx),) + rest.shape[1:])


def smooth_field(
    shape: tuple[int, int, int], crop: tuple[slice, ...], rng: np.random.Generator, sd: float, order: int
) -> np.ndarray:
    """Random zero-mean field of low-frequency cosines over ``shape`` with standard deviation ``sd``, on ``crop``."""
    return _expand([_cosine_factors(shape, crop, rng, sd, order, 1)])[..., 0]


def _rotation(rng: np.random.Generator, sd_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.normal(0.0, sd_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _warp(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Trilinear sampling of ``image`` at ``grid`` (..., 3): grid_sample's normalised (z, y, x) order.

    torch's ``grid_sample`` takes 0.3 s where ``scipy.ndimage.map_coordinates(order=1)`` takes
    0.9 s on a 1 mm volume (measured); sampling is most of the generation time.
    """
    sampled = torch.nn.functional.grid_sample(
        torch.from_numpy(image)[None, None],
        torch.from_numpy(grid)[None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    return sampled[0, 0].numpy()


def _acquire(anatomy: np.ndarray, bias: np.ndarray, protocol: Protocol, rng: np.random.Generator) -> np.ndarray:
    """MR intensities of a white-matter-normalised ``anatomy``: contrast curve, bias field, Rician noise.

    Only voxels inside the head are touched: the template is brain-extracted, so is the scan.
    """
    head = anatomy > 0.01
    signal = torch.from_numpy(anatomy[head]).pow(protocol.gamma) * torch.from_numpy(np.exp(bias[head]))
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise = torch.randn((2,) + signal.shape, generator=generator) * protocol.noise_sd
    intensity = np.zeros_like(anatomy)
    intensity[head] = torch.hypot(signal + noise[0], noise[1]).numpy()  # magnitude of complex noise
    return intensity


def render_subject(
    subject: BrainSubject,
    layout: BrainLayout,
    template: BrainTemplate,
    effects: Mapping[str, float],
    protocol: Protocol,
    rng: np.random.Generator,
) -> nib.Nifti1Image:
    """Synthesize one subject's T1 volume, stored as ``layout`` stores it.

    Parameters
    ----------
    subject
        Demographics of the subject.
    layout
        The cohort's storage conventions.
    template
        Prepared MNI152 template.
    effects
        Effect sizes for ``age`` and ``sex`` (the scanner effect is already in ``protocol``).
    protocol
        The acquisition of this scan.
    rng
        The subject's own random generator: anatomy variation, position, bias field and noise.
    """
    years = (subject.age - 20) / 60.0
    atrophy = (
        effects["age"]
        * rng.uniform(0.7, 1.3, 2)
        * [years**2 * _MAX_VENTRICLE_DILATION_MM, years * _MAX_CORTICAL_THINNING_MM]
    )
    source = aged_template(template, *np.maximum(atrophy, 0.0))

    sex_sign = 1.0 if subject.sex == "male" else -1.0
    scale = np.exp(effects["sex"] * sex_sign * _SEX_LOG_SCALE + rng.normal(0.0, _HEAD_LOG_SCALE_SD))
    rotation = _rotation(rng, _ROTATION_SD_DEG)
    position = rng.normal(0.0, _POSITION_SD_MM, 3)
    centre = template.centre_mm
    voxel = np.array(protocol.voxel_mm)
    shape = tuple(round(f / v) for f, v in zip(protocol.fov_mm, voxel))
    origin = centre - voxel * (np.array(shape) - 1) / 2.0

    # Only output voxels that can see the brain are sampled: the placed brain box plus a margin.
    corners = np.array(np.meshgrid(*template.brain_box_mm.T, indexing="ij")).reshape(3, -1).T
    placed = (corners - centre) @ (scale * rotation).T + centre + position
    margin = 4 * _DEFORMATION_SD_MM + 2 * voxel
    low = np.clip(np.floor((placed.min(0) - margin - origin) / voxel).astype(int), 0, shape)
    high = np.clip(np.ceil((placed.max(0) + margin - origin) / voxel).astype(int) + 1, 0, shape)
    crop = tuple(slice(a, b) for a, b in zip(low, high))

    # Template position sampled by output point w: m = c + R^T (w - c - p) / s + deformation, in
    # grid_sample's normalised coordinates, whose channels run (z, y, x) over the template axes.
    # Both terms are separable in the output x axis, so the grid is a single matrix product.
    to_grid = (2.0 / (np.array(source.shape) - 1) / np.diag(template.affine)[:3])[::-1]
    linear = (rotation.T / scale)[::-1] * to_grid[:, None]
    offset = (centre - rotation.T @ (centre + position) / scale - template.affine[:3, 3])[::-1] * to_grid - 1.0
    world = [origin[d] + voxel[d] * np.arange(low[d], high[d]) for d in range(3)]
    yz = offset + world[1][:, None, None] * linear[:, 1] + world[2][None, :, None] * linear[:, 2]
    affine_factors = (
        np.stack([world[0], np.ones_like(world[0])], axis=1).astype(np.float32),
        np.stack([np.broadcast_to(linear[:, 0], yz.shape), yz]).astype(np.float32),
    )
    fx, rest = _cosine_factors(shape, crop, rng, _DEFORMATION_SD_MM, 4, channels=3)
    grid = _expand([(fx, rest * to_grid.astype(np.float32)), affine_factors])
    anatomy = _warp(source, grid)
    intensity = _acquire(anatomy, smooth_field(shape, crop, rng, protocol.bias_sd, 3), protocol, rng)

    volume = np.zeros(shape, dtype=np.int16)
    volume[crop] = np.clip(np.rint(intensity * layout.white_matter_value), 0, np.iinfo(np.int16).max)
    affine = np.diag(np.append(voxel, 1.0))
    affine[:3, 3] = origin
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm", "sec")
    to_layout = nib.orientations.ornt_transform(
        nib.io_orientation(affine), nib.orientations.axcodes2ornt(layout.orientation)
    )
    image = image.as_reoriented(to_layout)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return image


def _site_protocols(layout: BrainLayout, scanner: float) -> dict[str, Protocol]:
    """Each site's protocol: the cohort's, with a small fixed per-site deviation, scaled by ``scanner``."""
    protocols = {}
    for code in layout.sites:
        # Seeded by the site code, not the cohort seed: a site's scanner is the same in every draw.
        site_rng = np.random.default_rng(zlib.crc32(f"{layout.kind}/{code}".encode()))
        jitter = {
            "voxel_mm": site_rng.uniform(0.97, 1.03),
            "gamma": site_rng.uniform(0.94, 1.06),
            "bias_sd": site_rng.uniform(0.8, 1.2),
            "noise_sd": site_rng.uniform(0.8, 1.2),
        }
        protocols[code] = _NEUTRAL.interpolate(layout.protocol.scaled(jitter), scanner)
    return protocols


def draw_subjects(layout: BrainLayout, n: int, rng: np.random.Generator) -> list[BrainSubject]:
    """Draw ``n`` subjects with sex, age and site independent of each other.

    Ages are uniform over the cohort's range and sexes balanced, so that a downstream confounding
    sampler can select any correlation between them.
    """
    ids = layout.new_id(rng, n)
    sexes = rng.permutation(np.resize(["female", "male"], n))
    ages = rng.integers(layout.ages[0], layout.ages[1] + 1, n)
    sites = rng.choice(list(layout.sites), n)
    first, last = datetime.date(2014, 5, 1).toordinal(), datetime.date(2020, 3, 1).toordinal()
    dates = rng.integers(first, last, n)
    return [
        BrainSubject(i, str(s), int(a), str(c), datetime.date.fromordinal(int(d)))
        for i, s, a, c, d in zip(ids, sexes, ages, sites, dates)
    ]


def generate_brain_cohort(
    kind: str,
    n: int,
    out: Path,
    seed: int,
    effects: Mapping[str, float],
    resolution_mm: float | None = None,
    progress: bool = True,
) -> Path:
    """Write ``n`` brain T1 stand-in subjects in the ``kind`` layout.

    See :func:`~mimm_med.data.standins.generate_cohort`.
    """
    layout = LAYOUTS[kind]
    resolution = 1.0 if resolution_mm is None else float(resolution_mm)
    template = load_template(max(1.0, resolution / 2.0))
    protocols = {
        code: p.scaled({"voxel_mm": resolution}) for code, p in _site_protocols(layout, effects["scanner"]).items()
    }
    cohort_rng = np.random.default_rng([seed, zlib.crc32(kind.encode())])
    subjects = draw_subjects(layout, n, cohort_rng)
    for index, subject in enumerate(tqdm(subjects, desc=f"{kind} stand-in", unit="subject", disable=not progress)):
        rng = np.random.default_rng([seed, zlib.crc32(kind.encode()), index])
        protocol = protocols[subject.site]
        # Field of view varies per scan (planning); scaled by the scanner effect like the rest.
        protocol = protocol.scaled({"fov_mm": 1.0 + effects["scanner"] * rng.uniform(-0.03, 0.03)})
        image = render_subject(subject, layout, template, effects, protocol, rng)
        with atomic_output(out / layout.image_path.format(id=subject.subject_id)) as tmp:
            nib.save(image, tmp)
    table = pd.DataFrame([layout.row(s) for s in subjects])
    with atomic_output(out / layout.table) as tmp:
        table.to_csv(tmp, index=False)
    return out
