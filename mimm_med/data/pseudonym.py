"""Keyed pseudonyms: the only subject identifiers that leave a preprocessing run.

A pseudonym is an HMAC-SHA256 of the source id under a key the user keeps. Without the key the
mapping can neither be inverted nor recomputed (unlike a plain hash of a 7-digit UK Biobank eid,
which anyone can brute-force); with it, the same subject gets the same pseudonym on every run,
every shard and every machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path

KEY_ENV_VAR = "MIMM_MED_PSEUDONYM_KEY"
MIN_KEY_LENGTH = 16
DIGEST_CHARS = 16  # 64 bits: collision odds below 1e-8 for a million subjects
#: Prefix of every subject pseudonym, the one BIDS gives subject folders and files.
SUBJECT_PREFIX = "sub-"

_HOW_TO_SET = (
    f"pass --key-file FILE (keeps the key out of shell history), --key KEY, or set {KEY_ENV_VAR}; "
    "make one with: python -c \"import secrets; print(secrets.token_hex(32))\" > pseudonym.key "
    "and keep it apart from the processed data (anyone holding it can re-identify subjects)"
)


class PseudonymKeyError(ValueError):
    """No usable pseudonymisation key was given."""


def resolve_key(
    key: str | None = None, key_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> bytes:
    """Return the pseudonymisation key from ``key_file``, ``key`` or the environment, in that order.

    Raises
    ------
    PseudonymKeyError
        If none is given, the key file cannot be read, is empty or is not text, or the key is shorter
        than ``MIN_KEY_LENGTH`` characters.
    """
    environ = os.environ if environ is None else environ
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise PseudonymKeyError(f"key file {path} does not exist; {_HOW_TO_SET}")
        source = f"key file {path}"
        try:
            key = path.read_bytes().decode("utf-8-sig").strip()  # a BOM from a Windows editor is no part of it
        except OSError as error:  # e.g. not readable by this user
            raise PseudonymKeyError(f"{source} cannot be read ({error.strerror or error}); {_HOW_TO_SET}") from None
        except UnicodeDecodeError:  # e.g. `head -c 32 /dev/urandom`; its bytes are never shown
            raise PseudonymKeyError(f"{source} does not hold text; {_HOW_TO_SET}") from None
        if not key:
            raise PseudonymKeyError(f"{source} is empty; {_HOW_TO_SET}")
    elif key is not None:
        source = "--key"
    else:
        key = environ.get(KEY_ENV_VAR)
        source = KEY_ENV_VAR
    if not key:
        raise PseudonymKeyError(f"no pseudonymisation key: {_HOW_TO_SET}")
    if len(key) < MIN_KEY_LENGTH:
        raise PseudonymKeyError(
            f"the key from {source} has {len(key)} characters; use at least {MIN_KEY_LENGTH}: {_HOW_TO_SET}"
        )
    return key.encode()


def write_synthetic_cohort_key(key_file: str | Path, label: str) -> Path:
    """Write a key derived from ``label`` to ``key_file`` (folders created), for generated cohorts only.

    The stand-in subjects are synthetic, so their key may be fixed: pseudonyms, hence splits, hence
    results, then repeat on every run and every machine. A real cohort's key is random and lives apart
    from its outputs.
    """
    key_file = Path(key_file)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(hashlib.sha256(label.encode()).hexdigest(), encoding="utf-8")
    with contextlib.suppress(PermissionError):  # a shared cache's file of another user stays as it is
        key_file.chmod(0o600)  # as a real key should be, so that no run warns of it
    return key_file


def readable_by_others(key_file: str | Path) -> bool:
    """Whether users other than the owner may read ``key_file`` (anyone who can may re-identify subjects)."""
    return bool(Path(key_file).stat().st_mode & 0o044)


_INTEGRAL_FLOAT = re.compile(r"(\d+)\.0+")


def canonical_text(value: object) -> str:
    """Spell a table value the same whether it was read as ``1000001``, ``1000001.0``, ``"1000001"`` or ``"1000001.0"``.

    Text of an integral float (a table once saved through a float column) loses its ``.0``; leading
    zeros (``012345``) stay, as ids need them.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    match = _INTEGRAL_FLOAT.fullmatch(text)
    return match.group(1) if match else text


class Pseudonymiser:
    """Map source subject ids and image paths to keyed pseudonyms.

    Parameters
    ----------
    key
        Secret key, e.g. from :func:`resolve_key`.

    Examples
    --------
    >>> pseudo = Pseudonymiser(b"0123456789abcdef0123")
    >>> pseudo.subject("ukb", "1000001")
    'sub-...'
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _digest(self, *parts: str) -> str:
        # NUL-separated so ("ab", "c") and ("a", "bc") differ.
        message = "\0".join(parts).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:DIGEST_CHARS]

    def subject(self, cohort: str, source_id: object) -> str:
        """Pseudonymous subject id; the cohort is hashed in so equal ids in two cohorts stay apart."""
        return SUBJECT_PREFIX + self._digest("subject", cohort, canonical_text(source_id))

    def image(self, cohort: str, source_id: object, relative_path: str) -> str:
        """Pseudonymous image id of one raw file (or DICOM series folder) of a subject."""
        return "img-" + self._digest("image", cohort, canonical_text(source_id), relative_path)

    @property
    def key_fingerprint(self) -> str:
        """Identifies the key without revealing it, so that outputs made with different keys can be told apart.

        An HMAC of a fixed text under the key: as safe to store beside the outputs as the pseudonyms are.
        """
        return "key-" + self._digest("key fingerprint")


def mask_identifier(text: str, identifier: str, replacement: str) -> str:
    """Replace ``identifier`` in ``text`` where it stands as a whole token (not inside a longer number)."""
    if not identifier:
        return text
    pattern = rf"(?<![0-9A-Za-z]){re.escape(identifier)}(?![0-9A-Za-z])"
    return re.sub(pattern, replacement, text)


def mask_subject(text: str, source_id: str, subject_id: str) -> str:
    """:func:`mask_identifier` of a subject's ``source_id`` by its pseudonym ``subject_id``.

    A BIDS ``sub-<source id>`` becomes the pseudonym itself, which carries the prefix already, rather
    than ``sub-sub-<hash>``.
    """
    if source_id:
        text = mask_identifier(text, SUBJECT_PREFIX + source_id, subject_id)
    return mask_identifier(text, source_id, subject_id)
