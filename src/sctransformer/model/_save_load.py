"""Model directories: weights as safetensors, everything else as JSON; atomic writes, no pickle."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sctransformer._constants import MODEL_FORMAT_VERSION

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "model.json"
#: The resolved config that ``sctransformer pretrain|finetune`` saves beside the model.
CONFIG_FILE = "config.yaml"
#: The files of a saved model directory, which a save with ``overwrite`` replaces.
MODEL_DIR_FILES = frozenset({STATE_FILE, WEIGHTS_FILE, CONFIG_FILE})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_value(value: object) -> object:
    """NumPy scalars and arrays (e.g. a hyper-parameter given as ``np.int64``) as plain JSON values."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def check_save_target(
    dir_path: str | os.PathLike, *, overwrite: bool, overwrite_option: str = "overwrite=True"
) -> Path:
    """Resolve ``dir_path`` and check that a model may be saved there; raise ``ValueError`` if not.

    A save replaces the whole directory, so only an empty directory, a missing one, or (with
    ``overwrite``) one that holds a saved model and nothing else (:data:`MODEL_DIR_FILES`) is
    accepted: other files there (data, figures) are never deleted. ``overwrite_option`` names
    the option in the message (``--overwrite`` on the command line).
    """
    target = Path(dir_path).resolve()  # through a symlink: replace the model it points to
    if target == Path.cwd() or target in Path.cwd().parents:
        raise ValueError(
            f"cannot save into {target}, the current working directory or one above it (the save "
            "replaces the directory); save into a subdirectory, e.g. 'model/'"
        )
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; choose another path")
    if target.exists() and any(target.iterdir()):
        if not (target / STATE_FILE).is_file():
            raise ValueError(
                f"{target} is not empty and does not hold a saved sctransformer model ({STATE_FILE} "
                "missing); a save replaces the whole directory, so choose a new or empty directory"
            )
        others = sorted(
            p.name + ("/" if p.is_dir() else "") for p in target.iterdir() if p.name not in MODEL_DIR_FILES
        )
        if others:
            shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
            raise ValueError(
                f"{target} holds a saved model and other files ({shown}); a save replaces the whole "
                "directory, which would delete them: move them out or save the model into another directory"
            )
        if not overwrite:
            raise ValueError(f"{target} holds a saved model; pass {overwrite_option} to replace it")
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    Returns ``False``, having changed nothing, where the system or the file system cannot.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (directories: where the system allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_model_dir(
    dir_path: str | os.PathLike, state: dict[str, Any], weights: dict[str, torch.Tensor], *, overwrite: bool
) -> Path:
    """Write ``state`` (JSON) and ``weights`` (safetensors) into ``dir_path``.

    Files are written into a temporary directory beside the target and flushed to disk; the
    directory then takes the target's place in one step (on Linux; elsewhere, and on file systems
    that cannot, by two renames, between which the previous model is beside the target as
    ``.<name>.old-<pid>``), so an interrupted save never leaves a half-written model where a good
    one was.
    """
    target = check_save_target(dir_path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # a directory as mkdir makes it (mkdtemp's is private)
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(weights, staging / WEIGHTS_FILE)
        _fsync(staging / WEIGHTS_FILE)
        state = {
            **state,
            "format_version": MODEL_FORMAT_VERSION,
            "weights_sha256": _sha256(staging / WEIGHTS_FILE),
        }
        with open(staging / STATE_FILE, "w") as f:
            json.dump(state, f, indent=1, default=_json_value)
            f.flush()
            os.fsync(f.fileno())
        _fsync(staging)
        if target.exists():
            # after an exchange, staging holds the previous model, removed below
            if not _exchange(staging, target):
                retired = target.parent / f".{target.name}.old-{os.getpid()}"
                target.rename(retired)
                try:
                    staging.rename(target)
                except OSError:
                    retired.rename(target)  # put the old model back where it was
                    raise
                shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
        _fsync(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def read_model_dir(dir_path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check a model directory written by :func:`write_model_dir`."""
    path = Path(dir_path)
    if not path.is_dir():
        retired = sorted(path.parent.glob(f".{path.name}.old-*")) if not path.exists() else []
        hint = (
            f"; a save onto it was interrupted, and the model it replaced is at {retired[0]}: rename that "
            "back to load it"
            if retired
            else ""
        )
        raise FileNotFoundError(f"{path} is not a directory holding a saved sctransformer model{hint}")
    missing = [name for name in (STATE_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a saved sctransformer model: {', '.join(missing)} missing "
            "(save a model with model.save(dir))"
        )
    try:
        with open(path / STATE_FILE) as f:
            state = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / STATE_FILE} is not valid JSON ({err}); the model is damaged") from err
    version = state.get("format_version") if isinstance(state, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{path / STATE_FILE} has no valid format_version (an integer from 1, got {version!r}); "
            "the file is damaged or was not written by sctransformer"
        )
    if version > MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved in model format {version!r} by sctransformer "
            f"{state.get('sctransformer_version', 'unknown')}; this sctransformer reads format "
            f"{MODEL_FORMAT_VERSION} and older: upgrade sctransformer"
        )
    expected = state.get("weights_sha256")
    if expected != _sha256(path / WEIGHTS_FILE):
        raise ValueError(
            f"{path / WEIGHTS_FILE} does not match the checksum recorded in {STATE_FILE}; "
            "the weights file is damaged or was replaced"
        )
    try:
        weights = load_file(path / WEIGHTS_FILE)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path / WEIGHTS_FILE} could not be read as safetensors: {err}") from err
    return state, weights
