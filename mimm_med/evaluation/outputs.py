"""Run a network over a data loader and gather its outputs and labels as arrays."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["collect_outputs", "input_dtype"]


def input_dtype(network: torch.nn.Module) -> torch.dtype:
    """The dtype of ``network``'s floating-point parameters (float32 without any), which its images are cast to.

    The trainer casts each batch so; without the same cast here, the float64 or integer images of a
    NumPy pipeline that trained fine stop a forward pass with ``Input type (double) and bias type
    (float) should be the same``.

    Examples
    --------
    >>> input_dtype(torch.nn.Linear(2, 2))
    torch.float32
    """
    return next((p.dtype for p in network.parameters() if p.is_floating_point()), torch.float32)


def collect_outputs(
    network: torch.nn.Module,
    data_loader: Iterable[Mapping[str, Any]],
    factor_names: Sequence[str],
    device: torch.device | str,
    amp: bool = False,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``network`` in eval mode without gradients over ``data_loader`` and concatenate the results.

    Parameters
    ----------
    network
        Module whose ``forward(image)`` returns the network contract dict: ``"features"``,
        ``f"{name}_features"`` and ``f"{name}_output"`` per factor.
    data_loader
        Iterable of batch dicts holding ``"image"`` and one label per name in ``factor_names``; images
        are cast to the dtype of the network's parameters (:func:`input_dtype`), as the trainer does.
    factor_names
        Factors whose labels are gathered, returned under ``f"{name}_label"``.
    device
        Device the network runs on; images are moved there.
    amp
        Run the forward pass under ``torch.autocast``; floating outputs are returned as float32.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    dict[str, np.ndarray]
        Every network output concatenated over batches (rows in loader order), plus
        ``f"{name}_label"`` for each factor.

    Examples
    --------
    >>> from monai.data import DataLoader
    >>> from mimm_med.networks import MIMMXNet
    >>> net = MIMMXNet("small_cnn", {"digit": 16, "thickness": 16}, {"digit": 2, "thickness": 2})
    >>> records = [{"image": torch.rand(1, 28, 28), "digit": i % 2, "thickness": i % 3 % 2} for i in range(36)]
    >>> test_loader = DataLoader(records, batch_size=16)
    >>> outputs = collect_outputs(net, test_loader, net.part_names, "cpu")
    >>> sorted(outputs)  # doctest: +NORMALIZE_WHITESPACE
    ['digit_features', 'digit_label', 'digit_output', 'features',
     'thickness_features', 'thickness_label', 'thickness_output']
    >>> outputs["digit_features"].shape, outputs["thickness_label"].shape
    ((36, 16), (36,))
    """
    device = torch.device(device)
    dtype = input_dtype(network)
    was_training = network.training
    network.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    try:
        with torch.no_grad():
            for batch in tqdm(data_loader, desc="collect outputs", disable=not progress):
                missing = [key for key in ("image", *factor_names) if key not in batch]
                if missing:
                    raise KeyError(
                        f"batch lacks {missing} (it has {sorted(batch)}); collect_outputs needs 'image' "
                        "and one label per factor name."
                    )
                with torch.autocast(device_type=device.type, enabled=amp):
                    outputs = network(torch.as_tensor(batch["image"]).to(device=device, dtype=dtype))
                for key, value in outputs.items():
                    chunks.setdefault(key, []).append(_as_numpy(value))
                for name in factor_names:
                    chunks.setdefault(f"{name}_label", []).append(_as_numpy(batch[name]))
    finally:
        network.train(was_training)
    if not chunks:
        raise ValueError("data_loader yielded no batches; check the test set it was built from.")
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def _as_numpy(value: Any) -> np.ndarray:
    tensor = torch.as_tensor(value).detach().cpu()
    if tensor.is_floating_point():
        # Autocast yields float16/bfloat16; NumPy has no bfloat16, and metrics want full precision.
        tensor = tensor.float()
    return np.asarray(tensor.numpy())
