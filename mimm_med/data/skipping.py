"""Inference that reads past unreadable images: one bad file costs its own prediction, not the others'."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

from monai.data import Dataset, list_data_collate

from mimm_med.data.manifest import file_size
from mimm_med.data.preprocess import describe_error

logger = logging.getLogger(__name__)


class SkippingDataset(Dataset):
    """A MONAI ``Dataset`` whose items that fail to load or transform come back as ``None``.

    Each failure is logged as a warning naming the image and the reason (from the worker process
    that met it, so the message survives ``num_workers > 0``). Batch with :func:`collate_readable`
    and iterate through :class:`ReadableBatches`, which leave the ``None`` items out
    (:class:`mimm_med.data.writers.PredictionTable` counts them).

    Parameters
    ----------
    data
        Datalist, e.g. :func:`mimm_med.data.datalist.image_datalist`.
    transform
        Loading and preprocessing of one item.
    name_key
        Key of an item that names it in the warning.
    """

    def __init__(self, data: Sequence[dict], transform: Callable | None = None, name_key: str = "image_path") -> None:
        super().__init__(data, transform)
        self.name_key = name_key

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:  # any failure of a file is that file's alone
            name = self.data[index].get(self.name_key, f"item {index}")
            # a transform that names its file (ValidateImaged(name_file=True)) would have it named twice
            reason = describe_error(error).replace(f"{name}: ", "", 1)
            missing = "cannot find a suitable reader" in reason or "No such file" in reason
            if missing and isinstance(name, str) and file_size(name) is None:  # MONAI's words: "install the reader libraries"
                reason = "no such file (moved or deleted since the manifest was written)"
            logger.warning("skipped %s: %s", name, reason)
            return None


def collate_readable(batch: Sequence[Any]) -> Any | None:
    """MONAI's ``list_data_collate`` of the items of ``batch`` that are not ``None``.

    Returns ``None`` when every item is ``None``: :class:`ReadableBatches` leaves such a batch out.
    """
    readable = [item for item in batch if item is not None]
    return list_data_collate(readable) if readable else None


class ReadableBatches:
    """The batches of a loader batched by :func:`collate_readable` that hold at least one image.

    A batch made only of unreadable images (e.g. a last batch of one bad image) is left out rather
    than stopping the run. Having no length, it lets MONAI's engines count the batches as they come.

    Parameters
    ----------
    loader
        ``DataLoader`` over a :class:`SkippingDataset` with ``collate_fn=collate_readable``.

    Raises
    ------
    ValueError
        When iterated, if not one image could be read: so many unreadable images point at the
        storage rather than at single files.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        read_any = False
        for batch in self.loader:
            if batch is not None:
                read_any = True
                yield batch
        if not read_any:
            dataset = getattr(self.loader, "dataset", None)
            counted = f"{len(dataset)} " if isinstance(dataset, Sized) else ""
            raise ValueError(
                f"none of the {counted}images could be read (each is named in a warning above): check that the "
                "manifest's images are where it says and complete, e.g. rerun `mimm-med preprocess`"
            )
