"""Silencing of notices mimm-med does not want printed: MONAI's about a GPU DICOM decoder it does not use, ITK's that name raw files."""

from __future__ import annotations

import functools
import logging
import warnings


def quiet_gpu_decoder_notices() -> None:
    """Silence MONAI's notices that the GPU DICOM decoder (nvImageCodec) is missing.

    Every ``LoadImage`` registers all of MONAI's readers, whatever reader it is given, so each run
    on a machine without nvImageCodec prints them although pydicom's own decoders do the work.
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")


@functools.cache
def quiet_itk_warnings() -> None:
    """Turn off ITK's warnings, which its C++ code prints to stderr with the raw file's path.

    The raw path holds the subject's identifier (a UK Biobank eid, a NAKO id), which mimm-med keeps
    out of every output and log; what ITK would warn of about a DICOM series (missing or unevenly
    spaced slices) :func:`mimm_med.data.readers.check_dicom_series` reports, without the path.
    Cached: the first call loads ITK's core module, which takes seconds.
    """
    from monai.utils import optional_import  # here: the command line imports this module, and MONAI takes seconds

    itk, _ = optional_import("itk", allow_namespace_pkg=True)
    itk.ProcessObject.SetGlobalWarningDisplay(False)
