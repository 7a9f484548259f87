"""Resume a training run from the newest checkpoint in its folder, if there is one."""

from __future__ import annotations

import itertools
import json
import logging
import re
import shlex
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from mimm_med.checks import is_whole_number
from mimm_med.data.writers import atomic_output
from mimm_med.distributed import is_rank_zero, rank_zero_choice

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
#: Settings that change what a trained network's numbers mean: given others, an evaluation or an
#: inference reads its outputs as other classes (label levels in another order), feeds it images of
#: another size, or builds another network for its weights.
TRAINED_SETTINGS = ("label_levels", "primary", "spatial_size", "part_size", "network_def")
#: Written once every ``COMPLETED`` handler of a run has run (the model is registered, MLflow's run closed).
FINISHED_FILE = "finished.json"


class RunFolderConflict(ValueError):
    """A run folder holds checkpoints that this run must not resume; the message names the folder and the fix."""


class RunFinished(RunFolderConflict):
    """The run folder's checkpoints have finished all the epochs of this run."""


class SettingsMismatch(ValueError):
    """An evaluation or inference runs with other settings than its network was trained with; the message names the overrides."""


def normal_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` in JSON-normal form, so that a tuple setting equals the list read back from a record."""
    return json.loads(json.dumps(dict(settings), default=str))


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] | None = None) -> list[str]:
    """The keys (``keys``, or every key of either) whose values differ between ``saved`` and ``current``, sorted."""
    keys = {*saved, *current} if keys is None else set(keys)
    return sorted(key for key in keys if saved.get(key) != current.get(key))


def refuse_other_settings(
    current: Mapping[str, Any], trained: Mapping[str, Any], source: str, keys: Sequence[str] = TRAINED_SETTINGS
) -> None:
    """Raise :class:`SettingsMismatch` if ``current`` differs from ``trained`` in any of ``keys`` that ``trained`` records.

    Parameters
    ----------
    current
        The settings of this run, as ``ResumeFromLatest`` is given them.
    trained
        The settings the network was trained with.
    source
        Where ``trained`` comes from, named in the message.
    keys
        The settings to compare; one that ``trained`` lacks (a record older than the setting) is not checked.

    Raises
    ------
    SettingsMismatch
        Naming each differing setting, both values, and the command-line overrides that match the training.
    """
    # both JSON-normal: a tuple setting equals the list a record or another run's params hold
    current, trained = normal_settings(current), normal_settings(trained)
    changed = changed_settings(trained, current, [key for key in keys if key in trained])
    if not changed:
        return
    shown = "\n".join(f"  {key}: {_difference(trained[key], current.get(key))}" for key in changed)
    overrides = [_override(key, trained[key]) for key in changed if key != "network_def"]
    fixes = [f"add {' '.join(overrides)}"] if overrides else []
    if "network_def" in changed:  # built from other settings (e.g. --backbone), which the record does not hold one by one
        fixes.append("build its network as in training (e.g. the same --backbone; network_def of that record is its definition)")
    raise SettingsMismatch(
        f"this run's settings differ from those its network was trained with ({source}):\n{shown}\n"
        f"run it with the settings of the training: {'; '.join(fixes)}"
    )


def _difference(trained: Any, current: Any) -> str:
    if isinstance(trained, str) and isinstance(current, str) and "\n" in trained:  # a network's repr: its first differing line
        pairs = itertools.zip_longest(trained.splitlines(), current.splitlines(), fillvalue="")
        line, (then, now) = next((n, pair) for n, pair in enumerate(pairs, 1) if pair[0] != pair[1])
        return f"line {line} is {then.strip()!r} in training, {now.strip()!r} now"
    return f"{trained!r} in training, {current!r} now"


def _override(key: str, value: Any) -> str:
    if isinstance(value, str):
        return f"--{key} {shlex.quote(value)}"
    text = repr(value)
    return f"--{key} {text}" if re.fullmatch(r"[\w.+-]+", text) else f'--{key} "{text}"'


def require_checkpoint_settings(checkpoint: str | Path, current: Mapping[str, Any]) -> None:
    """:func:`refuse_other_settings` of ``current`` against the ``settings.json`` beside ``checkpoint``.

    Without that record (a checkpoint copied without its folder) nothing can be checked: a warning
    says so and names the settings that must match the training.

    Examples
    --------
    A run folder as ``ResumeFromLatest(settings=...)`` leaves it, with its ``settings.json``:

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> run_folder = Path(tempfile.mkdtemp())
    >>> trained = {"primary": "age_group", "spatial_size": [96, 96, 96]}
    >>> _ = (run_folder / "settings.json").write_text(json.dumps(trained))
    >>> require_checkpoint_settings(run_folder / "model.pt", trained)  # the same settings: nothing to say
    >>> resized = {**trained, "spatial_size": (64, 64, 64)}
    >>> require_checkpoint_settings(run_folder / "model.pt", resized)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    mimm_med.engines.resume.SettingsMismatch: this run's settings differ from those its network was trained with (.../settings.json):
      spatial_size: [96, 96, 96] in training, [64, 64, 64] now
    run it with the settings of the training: add --spatial_size "[96, 96, 96]"
    """
    record = Path(checkpoint).parent / SETTINGS_FILE
    if record.is_file():
        refuse_other_settings(current, json.loads(record.read_text(encoding="utf-8")), str(record))
    else:
        _warn_unrecorded(record, "using the network")


def training_params(checkpoint: str | Path, current: Mapping[str, Any], evaluated: Sequence[str] = ("dataset_dir",)) -> dict[str, Any]:
    """``current`` params with the values that ``settings.json`` beside ``checkpoint`` records for its training.

    An evaluation logs the training run's settings, so that evaluations can be filtered and compared
    by them; the bundle's own values (``mi_weight``, ``lr``, ``epochs`` ...) are those of the training
    only when it was run with the same overrides. ``evaluated`` (the data evaluated) and
    ``network_def`` (logged as a summary, recorded in full) keep their ``current`` values, as does
    every key without a record.

    Examples
    --------
    >>> import json, tempfile
    >>> run_folder = Path(tempfile.mkdtemp())
    >>> _ = (run_folder / "settings.json").write_text(json.dumps({"mi_weight": 0.5, "dataset_dir": "data/a"}))
    >>> training_params(run_folder / "model.pt", {"mi_weight": 1.0, "dataset_dir": "data/b", "seed": 0})
    {'mi_weight': 0.5, 'dataset_dir': 'data/b', 'seed': 0}
    """
    record = Path(checkpoint).parent / SETTINGS_FILE
    if not record.is_file():
        return dict(current)
    trained = json.loads(record.read_text(encoding="utf-8"))
    kept = {*evaluated, "network_def"}
    return {key: trained[key] if key in trained and key not in kept else value for key, value in current.items()}


def _warn_unrecorded(record: Path, action: str) -> None:
    logger.warning(
        "%s is missing, so this run's settings cannot be checked against the training's; %s as it is: %s must be "
        "those of the training, or its outputs mean other classes or images. Copy the run folder's settings.json "
        "beside the checkpoint to have them checked",
        record, action, ", ".join(TRAINED_SETTINGS),
    )


def latest_checkpoint(directory: str | Path, pattern: str = "*.pt") -> Path | None:
    """The most recently written complete file matching ``pattern`` in ``directory``, or ``None``.

    MONAI's ``CheckpointSaver`` writes in place (ignite's ``Checkpoint`` first removes the oldest of its
    ``n_saved`` files), so a run killed while saving leaves a truncated newest file: such files
    (``torch.save`` archives without their closing zip directory) are skipped with a warning. Save
    with ``n_saved=2`` so that a complete checkpoint is left in that case.
    """
    candidates = sorted(Path(directory).glob(pattern), key=_saving_order, reverse=True)
    for path in candidates:
        if _is_complete_archive(path):
            return path
        logger.warning("skipping %s: not a complete checkpoint (the run was probably stopped while saving it)", path)
    return None


def _saving_order(path: Path) -> tuple[int, int]:
    """Modification time, then the epoch or iteration ending the name (``checkpoint_trainer_epoch=2.pt``).

    The kernel stamps files with a clock of a few milliseconds' resolution, so checkpoints saved in
    quick succession can share a modification time.
    """
    number = re.search(r"(\d+)$", path.stem)
    return path.stat().st_mtime_ns, int(number.group(1)) if number else -1


def trained_checkpoint(path: str | Path, registered_model: str | None = None) -> Path:
    """``path`` if it is a checkpoint file; else a ``FileNotFoundError`` that says how to make one.

    ``registered_model`` names the model in the MLflow registry to load instead, where the caller can.
    """
    path = Path(path)
    instead = f", or load a registered model with --model_uri models:/{registered_model}@champion" if registered_model else ""
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: train first (python -m monai.bundle run training ..., with the same "
            f"--run_name and --bundle_root, or the same method and seed){instead}"
        )
    problem = _checkpoint_problem(path)
    if problem:
        raise ValueError(
            f"{path} cannot be loaded as a checkpoint ({problem}): copy it again from the run folder, give --ckpt_path "
            f"another checkpoint of the run (its checkpoint_*.pt keep the network too){instead}"
        )
    return path


def _checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, read from its first bytes and its zip directory; ``None`` if it may be one.

    ``torch.load`` of a cut-off archive says only ``OSError: [Errno 22] Invalid argument``, naming no file.
    """
    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):  # a zip archive, the format of torch.save
        return None if _is_complete_archive(path) else "its zip archive is cut off, e.g. by a copy or a save that was stopped"
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format (_use_new_zipfile_serialization=False)
        return None
    return "it is neither a zip archive nor a pickle, the formats of torch.save"


def load_trained_weights(network: torch.nn.Module, checkpoint: str | Path, map_location: Any = "cpu") -> torch.nn.Module:
    """Load the ``network`` entry of ``checkpoint`` (or a bare state dict) into ``network`` and return it.

    Raises
    ------
    ValueError
        If the file is no complete checkpoint, or holds another network (other backbone, parts, factors),
        naming the file and the fix.
    """
    checkpoint = trained_checkpoint(checkpoint)
    state = torch.load(checkpoint, map_location=map_location, weights_only=True)
    try:
        network.load_state_dict(state.get("network", state))
    except RuntimeError as error:  # torch lists every mismatched tensor, but neither the file nor the fix
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise ValueError(
            f"{checkpoint} holds another network than these settings build ({first} ...): evaluate or infer with "
            "the settings it was trained with (the same backbone, part sizes, spatial size and factors), or train again"
        ) from error
    return network


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _is_complete_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path):  # reads the directory at the end of the file, which is written last
            return True
    except (zipfile.BadZipFile, OSError):
        return False


class ResumeFromLatest:
    """On ``STARTED``, load the newest checkpoint of ``directory`` into ``load_dict`` with MONAI's CheckpointLoader.

    A run killed mid-epoch restarts at the start of the epoch after its last checkpoint, with network,
    critics, optimizers, scaler, epoch counter and weighting state as saved; one killed while saving
    restarts from the checkpoint before (see :func:`latest_checkpoint`). Nothing happens when the
    folder holds no checkpoint yet (a fresh run).

    The best-model saver (``save_key_metric=True``) keeps its ranking only in memory; saved with
    ``key_metric_save_state=True`` the ranking travels in its file, and handing that saver here
    restores it, so the first validation after a resume replaces the best model only when it beats
    the best before the kill.

    Parameters
    ----------
    directory
        Where ``CheckpointSaver`` writes the run's checkpoints.
    load_dict
        Objects to restore, e.g. ``trainer.checkpoint_items()``.
    pattern
        Glob of the resumable checkpoints in ``directory``.
    best_model_saver
        The run's best-model ``CheckpointSaver`` (``key_metric_save_state=True``), or None.
    best_model_file
        Its ``key_metric_filename`` in ``directory``.
    keep
        The interval saver's ``n_saved``. Its rotation knows only the files it wrote itself, so the
        checkpoints a resumed run found in ``directory`` are deleted here once the run has saved
        ``keep`` of its own; until then they are a fallback. ``None`` keeps them.
    settings
        The run's settings (e.g. the parameters it logs to MLflow), recorded in ``directory`` when
        the run starts fresh. A checkpoint is resumed only under the settings it was trained with,
        and never once its run has finished: :meth:`attach` raises :class:`RunFolderConflict`
        (:class:`RunFinished`) instead, before any ``STARTED`` handler runs (a rerun with another
        ``mi_weight`` would otherwise continue, and register, the old weights).

    A run has finished when all its ``COMPLETED`` handlers have run: ``finished.json`` is written
    then, by a handler this one appends on ``STARTED``, after all the others. A run stopped after
    its last epoch's checkpoint but before that (killed while registering its model) is resumed:
    with every epoch done, it runs only its ``COMPLETED`` handlers.
    """

    def __init__(
        self,
        directory: str | Path,
        load_dict: Mapping[str, Any],
        pattern: str = "checkpoint_*.pt",
        best_model_saver: CheckpointSaver | None = None,
        best_model_file: str = "model.pt",
        keep: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if keep is not None and not is_whole_number(keep, minimum=1):
            raise ValueError(f"keep must be a whole number >= 1 (the checkpoint saver's n_saved) or None, got {keep!r}")
        self.directory = Path(directory)
        self.load_dict = dict(load_dict)
        self.pattern = pattern
        self.best_model_saver = best_model_saver
        self.best_model_file = best_model_file
        self.keep = None if keep is None else int(keep)
        self.settings = None if settings is None else normal_settings(settings)
        self.checkpoint: Path | None = None
        self._inherited: dict[Path, int] = {}

    def attach(self, engine: Engine) -> None:
        """Check the folder now and load on ``STARTED``; attach it first, so later ``STARTED`` handlers see the restored state.

        :attr:`checkpoint` is then the checkpoint to resume from, or ``None`` for a fresh run. Under
        ``torch.distributed`` rank 0 chooses it for every rank: a rank that listed the folder on its
        own could see another newest file (a shared file system's cached listing on another node)
        and train other epochs than the rest, until the collectives no longer match.
        """
        self.checkpoint = rank_zero_choice(latest_checkpoint(self.directory, self.pattern) if is_rank_zero() else None)
        if self.checkpoint is None:
            self._record_settings()
        else:
            self._check_resumable(self.checkpoint)
            # with its modification time: a file the saver writes again under the same name is its own
            self._inherited = {path: path.stat().st_mtime_ns for path in self.directory.glob(self.pattern)}
        engine.add_event_handler(Events.STARTED, self)

    def _record_settings(self) -> None:
        if self.settings is None or not is_rank_zero():
            return
        with atomic_output(self.directory / SETTINGS_FILE) as temporary:
            # unsorted: the order of label_levels' factors is the order of the network's parts, and the
            # override that a refusal prints must keep it
            temporary.write_text(json.dumps(self.settings, indent=2), encoding="utf-8")

    def _check_resumable(self, path: Path) -> None:
        fixes = (
            f"give this run a folder of its own (--run_name <name> or --bundle_root <folder>), or delete "
            f"{self.directory} to train it again from the start"
        )
        record = self.directory / SETTINGS_FILE
        if self.settings is not None and not record.is_file():
            _warn_unrecorded(record, f"resuming from {path.name}")
        elif self.settings is not None:
            saved = json.loads(record.read_text(encoding="utf-8"))
            # the settings the record holds: one it lacks is newer than the run, which trained without it
            changed = changed_settings(saved, self.settings, saved)
            if changed:
                shown = "; ".join(f"{key}: {saved.get(key)!r} there, {self.settings.get(key)!r} now" for key in changed)
                raise RunFolderConflict(
                    f"{self.directory} holds checkpoints of a run with other settings ({shown}). Resume it with "
                    f"its own settings, or {fixes}"
                )
        finished = self.directory / FINISHED_FILE
        if finished.is_file():
            counts = json.loads(finished.read_text(encoding="utf-8"))
            raise RunFinished(
                f"the run in {self.directory} has finished: {path.name} holds epoch {counts['epoch']} of "
                f"{counts['max_epochs']}, and its best model is {self.directory / self.best_model_file}. "
                f"Evaluate it with the bundle's 'evaluating' workflow, or {fixes}"
            )

    def __call__(self, engine: Engine) -> None:
        # added now, when the bundle has attached every handler: it runs after all of them
        engine.add_event_handler(Events.COMPLETED, self._record_finished)
        if self.keep is not None and self._inherited and is_rank_zero():
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._drop_inherited)
        path = self.checkpoint
        if path is None:
            return
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=str(engine.state.device))(engine)
        logger.info("resumed from %s at epoch %d", path, engine.state.epoch)
        self._restore_best_model_ranking()

    def _drop_inherited(self, engine: Engine) -> None:
        own = [path for path in self.directory.glob(self.pattern) if self._inherited.get(path) != _mtime(path)]
        if len(own) < self.keep:
            return
        for path, mtime in self._inherited.items():
            if _mtime(path) == mtime:
                path.unlink()
                logger.info("deleted %s: checkpoint of the run before the resume, superseded by %d newer ones", path, len(own))
        engine.remove_event_handler(self._drop_inherited, Events.EPOCH_COMPLETED)

    def _record_finished(self, engine: Engine) -> None:
        if not is_rank_zero():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.directory / FINISHED_FILE) as temporary:
            temporary.write_text(json.dumps({"epoch": engine.state.epoch, "max_epochs": engine.state.max_epochs}), encoding="utf-8")

    def _restore_best_model_ranking(self) -> None:
        best = self.directory / self.best_model_file
        if self.best_model_saver is None or not _is_complete_archive(best):
            return
        state = torch.load(best, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "checkpointer" not in state:
            logger.warning("%s holds no ranking (saved without key_metric_save_state); the next validation replaces it", best)
            return
        self.best_model_saver.load_state_dict(state["checkpointer"])
        logger.info("restored the ranking of the best model %s: %s", best, dict(state["checkpointer"]))
