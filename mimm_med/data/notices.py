"""Silencing of MONAI's notices about a GPU DICOM decoder that mimm-med does not use."""

from __future__ import annotations

import logging
import warnings


def quiet_gpu_decoder_notices() -> None:
    """Silence MONAI's notices that the GPU DICOM decoder (nvImageCodec) is missing.

    Every ``LoadImage`` registers all of MONAI's readers, whatever reader it is given, so each run
    on a machine without nvImageCodec prints them although pydicom's own decoders do the work.
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
