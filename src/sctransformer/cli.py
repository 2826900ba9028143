"""Command-line entry point: ``sctransformer pretrain | finetune | embed | predict``.

``pretrain`` trains a model from a config file (YAML or JSON) that records every setting::

    data:
      paths: [atlas_000.h5ad, atlas_001.h5ad]   # one path or a list, joined on shared genes
      layer: counts                              # null: X
      batch_key: batch
      phenotype_keys: [cell_type]                # optional: fine-tuning targets
      gene_key: null
      streaming: true                            # read rows from disk (ShardedAnnData); false: load all
      join: inner                                # genes of every file (inner) or of any (outer, streaming)
    model: {d_model: 64, n_layers: 2}            # GeneTransformer options
    train: {max_epochs: 10, checkpoint_dir: ckpt/, checkpoint_every_n_steps: 1000, resume: true,
            strategy: ddp, devices: 8, num_nodes: 4}   # GeneTransformer.train and Trainer options
    log: {loggers: [csv, tensorboard], dir: null, wandb_project: null}   # optional
    output: model/                               # saved model; the resolved config is saved beside it

Relative paths are taken beside the config file (``~`` is the home directory). Each data file is listed once (``a.h5ad`` and
``./a.h5ad`` are the same file: an error), and a key or section given twice is an error, not the
last one silently kept. The save replaces the whole ``output`` directory, so ``train.checkpoint_dir``
and ``log.dir`` must lie outside it (an error before training; put them beside it, e.g.
``checkpoint_dir: model-ckpt/``); a path where they cannot be created (below a file, in a
read-only folder) is an error before training too. ``train`` takes the options of
``GeneTransformer.train``, its early stopping's (``early_stopping_patience``, ...) and those of
Lightning's ``Trainer`` (all but ``logger``, ``callbacks``, ``plugins`` and ``default_root_dir``, which
the command sets); the common ones are checked when the config is read (e.g.
``accumulate_grad_batches`` a positive integer), the others by Lightning. With
``resume: true``, a checkpoint written on other data (other cells by name, or other genes) is
refused before training. Under ``strategy: ddp`` every process runs the command; the first
(global rank 0) saves the model and prints the result line.

The saved ``config.yaml`` runs again as it is (with another ``output``): it records what was
given and resolved, but not defaults that depend on the machine (``log.loggers`` left out) or
sections the command refuses (``model`` for ``finetune``).

``finetune`` takes the same config with ``reference: <saved model directory>`` in place of
``model``: the reference is attached to the data (its genes, bins and categories kept; new
phenotype keys get new heads, see :meth:`GeneTransformer.load_query_data`) and trained further,
e.g. with ``train: {freeze: backbone}``; ``data.min_gene_overlap`` (default 0.5) is the share of the
smaller gene set the data must share with the reference. The data are loaded into memory and read as the
reference was set up: ``data.layer``, ``data.gene_key`` and ``data.batch_key`` may be left out
(the saved config records the reference's), and are an error where they differ from it.

Metrics are logged per epoch to CSV (and TensorBoard when it is installed, where ``log.loggers``
is left out) in ``log.dir`` (default ``<output>-logs/``, beside the output, also for
``output: model/``); ``wandb`` in ``log.loggers`` logs to Weights & Biases, if installed, one W&B
run per command (finished when training ends).

Data loaded into memory (``streaming: false``, and ``finetune``) are checked file by file before
they are joined, as streamed shards are (``data.layer`` and the ``data.gene_key`` column present,
gene identifiers unique); an error names the file. Files written by anndata before 0.7 cannot
be streamed (nor read by ``embed``/``predict``): rewrite them once with
``anndata.read_h5ad(old).write_h5ad(new)``. In memory, data from several files record each cell's file in
``.obs["source_file"]``, as its path relative to the folder the files share (``sample_0/filtered.h5ad``
and ``sample_1/filtered.h5ad`` stay apart); where the files already have a ``source_file`` column, it is
kept and the file is recorded in ``source_file_1`` (or the next free name) instead.

``embed`` and ``predict`` apply a saved model to an ``.h5ad`` file and write a copy with the results;
the count matrix is read from disk in row blocks (never loaded whole, whether in X or a layer) and
the results are written into the copy without reading it. The counts are read from the model's
layer and its genes matched by its ``gene_key``, unless ``--layer`` (``X`` for ``.X``) or
``--gene-key`` (``var_names`` for the var names) name the input's own. Every error in the arguments or the
config is reported in one line, before any training, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import pandas as pd
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer

from sctransformer._settings import logger
from sctransformer.data._sharded import (
    check_gene_column,
    check_gene_identifiers,
    check_h5ad_layout,
    check_layer,
    check_shard_options,
    var_columns,
)
from sctransformer.data._splitting import check_splitter_option_names
from sctransformer.data._vocabulary import GENE_KEY_FIX
from sctransformer.model._save_load import CONFIG_FILE, check_save_target

if TYPE_CHECKING:
    from sctransformer.model import GeneTransformer

SECTIONS = {"data", "model", "reference", "train", "log", "output"}
DATA_KEYS = {
    "paths",
    "layer",
    "batch_key",
    "phenotype_keys",
    "gene_key",
    "streaming",
    "join",
    "min_gene_overlap",
}
LOG_KEYS = {"loggers", "dir", "wandb_project"}
LOGGERS = ("csv", "tensorboard", "wandb")


class ConfigError(ValueError):
    """A config file that cannot be used as it is."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found the key {key!r} twice; keep one (else the last would be used silently)",
                        key_node.start_mark,
                    )
                if isinstance(key, Hashable):
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _ConfigDumper(yaml.SafeDumper):
    """YAML's safe dumper, quoting the strings that :class:`_UniqueKeyLoader` would read as floats."""


# YAML 1.1 (PyYAML) reads 1e-4 as a string: it wants a dot (1.0e-4); YAML 1.2 and JSON read a float.
# The dumper knows it too, so that a string such as "1e3" is written quoted and read back a string.
for _yaml_class in (_UniqueKeyLoader, _ConfigDumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
del _yaml_class


def _absolute(path: str | os.PathLike, base: Path) -> str:
    """``path`` (``~`` expanded), taken beside ``base`` when relative, as a normalised absolute path (no trailing ``/``)."""
    return os.path.abspath(base / os.path.expanduser(path))


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies below it (compared as resolved paths)."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (``json`` keeps the last silently)."""
    config: dict[str, Any] = {}
    for key, value in pairs:
        if key in config:
            raise ValueError(f"found the key {key!r} twice; keep one (else the last would be used silently)")
        config[key] = value
    return config


def read_config(path: str | Path, command: str = "pretrain") -> dict[str, Any]:
    """Read and check a ``pretrain`` or ``finetune`` config (YAML or JSON).

    Every problem is a :class:`ConfigError`; relative paths are resolved beside the config file,
    and every path is normalised. A key given twice, a data file listed twice, a checkpoint or
    log directory inside the output directory (which the save replaces), or a ``Trainer`` option
    of ``train`` that Lightning would refuse is refused. Nothing is added for a section the
    command refuses, nor ``log.loggers`` where it is left out, so that the config, once saved
    beside the model, runs again on any machine.
    """
    from sctransformer.model import GeneTransformer

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":  # JSON may be indented with tabs, which YAML refuses
            config = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            config = yaml.load(text, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML/JSON"
        mark = getattr(err, "problem_mark", None)
        if isinstance(err, yaml.MarkedYAMLError) and mark is not None:  # one line, not PyYAML's excerpt
            detail = f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
            detail = f"{err.context}: {detail}" if err.context else detail
        else:
            detail = " ".join(str(err).split())
        raise ConfigError(f"config file {str(path)!r} is not valid {kind}: {detail}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping with sections {sorted(SECTIONS)}")
    unknown = set(config) - SECTIONS
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}; allowed: {sorted(SECTIONS)}")
    required, forbidden = (("data", "output"), "reference") if command == "pretrain" else (
        ("data", "reference", "output"), "model")  # fmt: skip
    for section in required:
        if section not in config:
            raise ConfigError(
                f"the config has no {section!r} section; add it (see `sctransformer {command} -h`)"
            )
    if forbidden in config:
        raise ConfigError(
            f"a {command} config has no {forbidden!r} section"
            + (" (the reference's hyper-parameters are kept)" if command == "finetune" else "")
        )
    for section in ("data", "model", "train", "log"):
        if section == forbidden:  # not recorded either: the saved config must run again as it is
            continue
        config.setdefault(section, {})
        if not isinstance(config[section] or {}, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of options")
        config[section] = config[section] or {}
    data = config["data"]
    if set(data) - DATA_KEYS:
        raise ConfigError(
            f"unknown keys in 'data': {sorted(set(data) - DATA_KEYS)}; allowed: {sorted(DATA_KEYS)}"
        )
    paths = data.get("paths")
    if isinstance(paths, str):
        paths = [paths]
    if not paths or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ConfigError("data.paths must be an .h5ad path or a non-empty list of them")
    base = path.parent
    resolved = [_absolute(p, base) for p in paths]
    missing = [p for p in resolved if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"data files not found: {missing}")
    seen: dict[Path, int] = {}
    for i, file in enumerate(resolved):  # its cells would count twice, in training and validation
        first = seen.setdefault(Path(file).resolve(), i)
        if first != i:
            raise ConfigError(
                f"data.paths lists the file {paths[i]!r} twice (also as {paths[first]!r}); list it once"
            )
    data["paths"] = resolved
    data.setdefault("streaming", False)
    data.setdefault("join", "inner")
    if not isinstance(data["streaming"], bool):
        raise ConfigError(f"data.streaming must be true or false, got {data['streaming']!r}")
    if data["join"] not in ("inner", "outer"):
        raise ConfigError(f"data.join must be 'inner' or 'outer', got {data['join']!r}")
    if data["join"] == "outer" and not data["streaming"]:
        raise ConfigError("data.join: outer needs data.streaming: true")
    if command == "finetune" and data["streaming"]:
        raise ConfigError("finetune loads its data into memory; set data.streaming: false")
    if "min_gene_overlap" in data:  # of the data with the reference's genes (load_query_data's)
        overlap = data["min_gene_overlap"]
        if command != "finetune":
            raise ConfigError(
                "data.min_gene_overlap is finetune's (the share of the reference's genes needed)"
            )
        if not (_is_number(overlap) and 0 < overlap <= 1):
            raise ConfigError(f"data.min_gene_overlap must be a number in (0, 1], got {overlap!r}")
    if command == "finetune":
        reference = config["reference"]
        if not isinstance(reference, str) or not reference:
            raise ConfigError("reference must be the directory of a saved model")
        config["reference"] = _absolute(reference, base)
        if not Path(config["reference"]).is_dir():
            raise ConfigError(f"reference {config['reference']!r} is not a directory of a saved model")
    log = config["log"]
    if set(log) - LOG_KEYS:
        raise ConfigError(
            f"unknown keys in 'log': {sorted(set(log) - LOG_KEYS)}; allowed: {sorted(LOG_KEYS)}"
        )
    # loggers left out are chosen when the run starts (_default_loggers), and not recorded: the
    # saved config then runs again on a machine without tensorboard
    loggers = log.get("loggers")
    if isinstance(loggers, str):
        loggers = log["loggers"] = [loggers]
    if loggers is None:
        loggers = _default_loggers()
    elif not isinstance(loggers, list) or set(loggers) - set(LOGGERS):
        raise ConfigError(f"log.loggers must be a list of {list(LOGGERS)}, got {loggers!r}")
    if len(set(loggers)) < len(loggers):  # two loggers of a kind would write into one folder or run
        twice = sorted({name for name in loggers if loggers.count(name) > 1})
        raise ConfigError(f"log.loggers names {twice} more than once; name each logger once")
    for name in ("tensorboard", "wandb"):
        if name in loggers and not _installed(name):
            raise ConfigError(f"log.loggers asks for {name}, which is not installed (pip install {name})")
    if log.get("wandb_project") is not None and "wandb" not in loggers:
        raise ConfigError(
            f"log.wandb_project is set but log.loggers ({loggers}) has no wandb; add wandb to log.loggers "
            "or leave wandb_project out"
        )
    for section, function in (("model", GeneTransformer.__init__), ("train", GeneTransformer.train)):
        allowed = set(inspect.signature(function).parameters) - {"self", "adata", "trainer_kwargs"}
        bad = set(config.get(section, {})) - allowed
        if section == "train":
            bad -= _TRAINER_OPTIONS
        if bad:
            raise ConfigError(
                f"unknown {section} options {sorted(bad)}; see GeneTransformer{'.train' * (section == 'train')}"
            )
    _check_trainer_options(config["train"])
    splitter = config["train"].get("datasplitter_kwargs")
    if splitter is not None:  # else a misspelt option fails once the data are loaded
        if not isinstance(splitter, dict):
            raise ConfigError("train.datasplitter_kwargs must be a mapping of options")
        try:
            (check_shard_options if data.get("streaming") else check_splitter_option_names)(splitter)
        except ValueError as err:
            raise ConfigError(f"train.{err}") from err
    if not isinstance(config["output"], str) or not config["output"]:
        raise ConfigError("output must be the path of the directory to save the model in")
    output = config["output"] = _absolute(config["output"], base)  # "model/": logs beside it, not in it
    log["dir"] = _absolute(log.get("dir") or _default_log_dir(output), base)
    if config["train"].get("checkpoint_dir") is not None:
        config["train"]["checkpoint_dir"] = _absolute(config["train"]["checkpoint_dir"], base)
    for name, directory in (("train.checkpoint_dir", config["train"].get("checkpoint_dir")),
                            ("log.dir", log["dir"])):  # fmt: skip
        if directory is not None and _inside(directory, output):
            raise ConfigError(
                f"{name} {directory!r} is inside the output directory {output!r}, which the save "
                f"replaces; put it beside it (e.g. {output}-{'ckpt' if name.startswith('train') else 'logs'})"
            )
    return config


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _default_log_dir(output: str) -> str:
    """``log.dir`` where the config leaves it out: beside the output, ``<output>-logs``."""
    return f"{output}-logs"


def _default_loggers() -> list[str]:
    """The loggers of a config without ``log.loggers``: CSV, and TensorBoard where it is installed."""
    return ["csv", "tensorboard"] if _installed("tensorboard") else ["csv"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: Lightning's limits of minibatches per epoch (``limit_train_batches``, ``limit_val_batches``).
_LIMIT_RULE = (
    lambda v: v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
    "a share of the minibatches (a float from 0.0 to 1.0), a number of minibatches (an integer "
    ">= 0), or null for all",
)
#: ... where none would train nothing (and save the initial weights as a trained model)
_TRAIN_LIMIT_RULE = (
    lambda v: v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
    "a share of the minibatches (a float above 0.0, at most 1.0), a number of minibatches (a positive "
    "integer), or null for all",
)
#: What each Lightning ``Trainer`` option of the ``train`` section must be, as (check, description).
_TRAINER_OPTION_RULES = {
    "num_nodes": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "strategy": (lambda v: isinstance(v, str) and v != "", "the name of a Lightning strategy (e.g. ddp)"),
    "max_steps": (lambda v: _is_int(v) and (v >= 1 or v == -1), "a positive integer, or -1 for no limit"),
    "gradient_clip_val": (lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0, or null"),
    "accumulate_grad_batches": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "log_every_n_steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "enable_progress_bar": (lambda v: isinstance(v, bool), "true or false"),
    "limit_train_batches": _TRAIN_LIMIT_RULE,
    "limit_val_batches": _LIMIT_RULE,
    "val_check_interval": (
        lambda v: v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
        "a share of an epoch (a float above 0.0, at most 1.0), a number of minibatches (a positive "
        "integer), or null",
    ),
    "check_val_every_n_epoch": (
        lambda v: v is None or (_is_int(v) and v >= 1),
        "a positive integer, or null",
    ),
    "num_sanity_val_steps": (lambda v: _is_int(v) and v >= -1, "an integer >= 0, or -1 for all"),
    "overfit_batches": (
        lambda v: _is_number(v) and v == 0,
        "0 (overfitting a few minibatches is not supported: Lightning's loader for it cannot batch the "
        "sparse counts; use limit_train_batches instead)",
    ),
    "early_stopping_monitor": (lambda v: isinstance(v, str) and v != "", "the name of a logged metric"),
    "early_stopping_min_delta": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "early_stopping_patience": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "early_stopping_warmup_epochs": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "early_stopping_mode": (lambda v: v in ("min", "max"), "min or max"),
}


def _check_trainer_options(train: dict[str, Any]) -> None:
    """Raise a :class:`ConfigError` for a ``Trainer`` option of the ``train`` section that Lightning would refuse.

    Checked when the config is read, so that a bad value is one line before anything runs, not a
    traceback from Lightning (or a division by zero) once the data are loaded.
    """
    for key, (valid, description) in _TRAINER_OPTION_RULES.items():
        if key in train and not valid(train[key]):
            raise ConfigError(f"train.{key} must be {description}, got {train[key]!r}")


#: Options of the early stopping ``train`` sets up with ``early_stopping: true`` (as ``GeneTransformer.train``)
_EARLY_STOPPING_OPTIONS = {
    f"early_stopping_{name}" for name in ("monitor", "min_delta", "patience", "warmup_epochs", "mode")
}
#: Lightning ``Trainer`` options accepted in the ``train`` section (passed through ``**trainer_kwargs``):
#: every one but those the command sets itself (loggers, callbacks, plugins, the root directory)
_TRAINER_OPTIONS = (
    set(_TRAINER_OPTION_RULES)
    | _EARLY_STOPPING_OPTIONS
    | (
        set(inspect.signature(Trainer.__init__).parameters)
        - {"self", "logger", "callbacks", "plugins", "default_root_dir"}
    )
)


def _load_data(data: dict[str, Any]) -> ad.AnnData:
    """Read the data files; several are joined on the genes they all have (by identifier).

    Layers and ``.obsm`` entries are those every file has; ``.obs`` columns are those of any file,
    missing values (NaN) where a file lacks one (its cells are unknown for a phenotype column). An
    unreadable file is an error naming it, and so is one without ``data.layer``, without the
    ``data.gene_key`` column or with a gene identifier missing or given twice (checked as for
    streamed shards, before the files are joined); a file without cells is skipped with a
    warning; the genes each file loses in the join are logged. Each cell's file is recorded in
    ``.obs["source_file"]`` as its path relative to the folder the files share (``source_file_1``
    or the next free name where a file has a ``source_file`` column of its own, which is kept).
    """
    files = [os.path.abspath(p) for p in data["paths"]]
    # keys relative to the shared folder: sample_0/filtered.h5ad and sample_1/filtered.h5ad stay apart
    common = os.path.commonpath([os.path.dirname(f) for f in files])
    keys = [os.path.relpath(f, common) for f in files]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f"data files listed twice: {twice}; list each file once")
    layer, gene_key = data.get("layer"), data.get("gene_key")
    parts, names, identifiers = [], [], []
    for path, key in zip(data["paths"], keys, strict=True):
        try:
            part = ad.read_h5ad(path)
        except Exception as err:  # h5py / anndata raise many types for a damaged file
            raise ValueError(f"cannot read data file {path!r}: {err}") from err
        if part.n_obs == 0:
            warnings.warn(f"data file {path!r} has no cells; skipped", UserWarning, stacklevel=2)
            continue
        # each file checked as a shard is: else the join drops a layer one file lacks, or fails
        # on a repeated gene, with an error that names neither the file nor the cause
        if layer is not None:
            check_layer(path, list(part.layers), layer)
        if gene_key is not None:
            check_gene_column(path, list(part.var.columns), gene_key)
        ids = check_gene_identifiers(path, part.var[gene_key] if gene_key else part.var_names, gene_key)
        parts.append(part)
        names.append(key)
        identifiers.append(pd.Index(ids))
    if not parts:
        raise ValueError("every data file is empty; nothing to train on")
    if len(parts) == 1:
        return parts[0]
    shared = identifiers[0]
    for ids in identifiers[1:]:
        shared = shared.intersection(ids, sort=False)
    for name, ids in zip(names, identifiers, strict=True):
        logger.info("%s: %d of its %d genes are in every file (%.0f%%)", name, len(shared), len(ids),
                    100 * len(shared) / max(len(ids), 1))  # fmt: skip
    if len(shared) == 0:
        raise ValueError(f"the data files share no gene identifier: {names}")
    if gene_key:  # join on the identifiers, not on whatever var_names hold
        for part, ids in zip(parts, identifiers, strict=True):
            part.var_names = ids
    columns = set().union(*(part.obs.columns for part in parts))
    label, n = "source_file", 0
    while label in columns:
        n += 1
        label = f"source_file_{n}"
    if label != "source_file":  # a column of the user's own is never overwritten
        logger.warning(
            "the data files have an .obs['source_file'] column; each cell's file is in .obs[%r]", label
        )
    # genes, layers and obsm: those of every file (a layer one file lacks is not filled with zeros)
    adata = ad.concat(parts, join="inner", label=label, keys=names, merge="first")
    # .obs: the columns of any file, so that a label column one file lacks is unknown (NaN) for
    # its cells, as with streaming, instead of dropped for all
    obs = ad.concat([ad.AnnData(obs=part.obs) for part in parts], join="outer", label=label, keys=names).obs
    if not obs.index.equals(adata.obs_names):  # the same cells in the same order, by construction
        raise RuntimeError("the .obs of the data files could not be joined; please report this")
    adata.obs = obs
    adata.obs_names_make_unique()
    return adata


#: ``data`` keys whose values ``finetune`` takes from the reference model's setup.
REFERENCE_SETUP_KEYS = ("layer", "gene_key", "batch_key")


def _check_reference_setup(data: dict[str, Any], reference: str, setup_args: dict[str, Any]) -> None:
    """Refuse ``data`` settings that differ from the reference's; fill in those left out.

    ``finetune`` reads counts, gene identifiers and batches as the reference model did, so a
    different ``data.layer``, ``data.gene_key`` or ``data.batch_key`` would be ignored; it is a
    :class:`ConfigError` instead. Keys left out are set to the reference's values, so the config
    saved beside the model records what was used.
    """
    for key in REFERENCE_SETUP_KEYS:
        used = setup_args.get(key)
        if key in data and data[key] != used:
            raise ConfigError(
                f"data.{key} is {data[key]!r}, but finetune reads the data as the reference "
                f"{reference!r} was set up, with {key}={used!r}; set data.{key}: "
                f"{'null' if used is None else used} or leave it out"
            )
        data[key] = used


def _loggers(log: dict[str, Any]) -> list:
    """The Lightning loggers the ``log`` section asks for (default :func:`_default_loggers`), writing under ``log["dir"]``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    made = []
    names = log.get("loggers")
    for name in _default_loggers() if names is None else names:
        if name == "csv":
            made.append(CSVLogger(log["dir"], name="csv"))
        elif name == "tensorboard":
            made.append(TensorBoardLogger(log["dir"], name="tensorboard"))
        else:
            made.append(WandbLogger(project=log.get("wandb_project"), save_dir=log["dir"]))
    return made


def _finish_runs(loggers: Sequence[object]) -> None:
    """Finish the Weights & Biases run of each ``WandbLogger`` of ``loggers`` that started one.

    W&B keeps a run open for the whole process, and a ``WandbLogger`` made while one is open logs
    into it: a second run in the same process (e.g. ``main`` called twice) would go on in the first.
    """
    from lightning.pytorch.loggers import WandbLogger

    for made in loggers:
        # the started run, if any (as Lightning's finalize reads it): ``experiment`` would start one
        run = made._experiment if isinstance(made, WandbLogger) else None
        if run is not None:
            run.finish()


def _new_directories(directories: Sequence[Path], loggers: Sequence[object]) -> list[Path]:
    """The folders a run is about to create: the missing ones of ``directories`` and of the loggers' own.

    Read before the run, so that after a failure exactly these (where still empty) can be removed,
    and no folder that existed before is touched.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    paths = list(directories)
    for made in loggers:
        if isinstance(made, CSVLogger | TensorBoardLogger):  # version_N below the logger's name folder
            paths += [Path(made.log_dir), Path(made.log_dir).parent]
    new = set()
    for path in paths:
        for folder in (path, *path.parents):
            if folder.exists():
                break
            new.add(folder)
    return sorted(new, key=lambda folder: -len(folder.parts))  # deepest first


def _distributed() -> bool:
    """Whether this process is one of several training together (its process group outlives training)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _global_rank() -> int:
    """The rank of this process among distributed training processes (0 where there are none)."""
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


def _check_output(output: Path, overwrite: bool) -> None:
    """Raise a :class:`ConfigError` where the model cannot be saved in ``output`` (:func:`check_save_target`)."""
    try:
        check_save_target(output, overwrite=overwrite, overwrite_option="--overwrite")
    except ValueError as err:
        raise ConfigError(f"output: {err}") from err


def _check_directory(directory: Path, name: str) -> None:
    """Raise a :class:`ConfigError` naming the config key ``name`` where ``directory`` cannot be created or written.

    Checked (nothing created) before training, so that a path below a file or a read-only folder is
    not found out only when the run saves its model or logs.
    """
    existing = next(p for p in (directory, *directory.parents) if p.exists())  # "/" at the latest
    if not existing.is_dir():
        cause = f"{str(existing)!r} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        cause = f"{str(existing)!r} is not writable"
    else:
        return
    raise ConfigError(
        f"{name}: cannot create or write the directory {str(directory)!r} ({cause}); choose another path"
    )


def _save(model: GeneTransformer, output: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Save the model and its config into ``output`` on global rank 0; other distributed ranks wait for it.

    Every distributed process runs the command (Lightning's ``ddp`` starts the others as copies of
    it); were each to save, they would race for ``output``, one failing on the model another saved.
    """
    import torch.distributed as dist

    try:
        if _global_rank() == 0:
            _check_output(output, overwrite)  # e.g. another run saved there while this one trained
            model.save(output, overwrite=overwrite)
            (output / CONFIG_FILE).write_text(
                yaml.dump(_recorded(config), Dumper=_ConfigDumper, sort_keys=False)
            )
    finally:
        if _distributed():
            dist.barrier()  # the other ranks end once the model is saved (or its save failed)


def _recorded(config: dict[str, Any]) -> dict[str, Any]:
    """The config to save beside the model: ``config`` without a ``log.dir`` that is the default.

    The default follows ``output`` (``<output>-logs``), so a saved config run again with another
    output logs beside that output, not into the first run's logs.
    """
    recorded = copy.deepcopy(config)
    if recorded["log"].get("dir") == _default_log_dir(recorded["output"]):
        del recorded["log"]["dir"]
    return recorded


def pretrain(config_path: str, *, overwrite: bool = False, command: str = "pretrain") -> Path:
    """Train and save a model as the config says (``command``: pretrain or finetune); returns its directory.

    Under distributed training every process runs this; only global rank 0 saves.
    """
    import sctransformer as sct

    config = read_config(config_path, command)
    output = Path(config["output"])
    _check_output(output, overwrite)  # before any training, as are the directories below
    _check_directory(output.parent, "output")
    _check_directory(Path(config["log"]["dir"]), "log.dir")
    data = config["data"]
    reference = None
    if command == "finetune":  # checked before the data are read
        reference = sct.GeneTransformer.load(config["reference"])
        _check_reference_setup(data, config["reference"], reference.setup_args_)
    setup = {key: data.get(key) for key in ("layer", "batch_key", "phenotype_keys", "gene_key")}
    if data["streaming"]:
        shards = sct.data.ShardedAnnData(data["paths"], join=data["join"], **setup)
        model = sct.GeneTransformer.from_shards(shards, **config["model"])
    else:
        adata = _load_data(data)
        if reference is not None:
            keys = setup["phenotype_keys"]
            if keys is None:  # fine-tuning: the reference's phenotypes in the data are the targets, as asked
                keys = [key for key in reference.phenotype_categories_ if key in adata.obs]
            model = sct.GeneTransformer.load_query_data(
                adata, reference, phenotype_keys=keys, min_gene_overlap=data.get("min_gene_overlap", 0.5)
            )
        else:
            sct.setup_anndata(adata, **setup)
            model = sct.GeneTransformer(adata, **config["model"])
    loggers = _loggers(config["log"])
    directories = [Path(config["log"]["dir"])]
    if config["train"].get("checkpoint_dir") is not None:
        directories.append(Path(config["train"]["checkpoint_dir"]))
    new = _new_directories(directories, loggers)
    try:
        model.train(**config["train"], logger=loggers)
    except BaseException:  # a run refused or failed leaves none of its folders empty behind
        for folder in new:
            with contextlib.suppress(OSError):  # not empty (e.g. checkpoints): kept
                folder.rmdir()
        raise
    finally:
        _finish_runs(loggers)
    _save(model, output, config, overwrite)
    return output


def _write_results(source: Path, target: Path, adata: ad.AnnData) -> None:
    """Copy ``source`` to ``target`` with ``adata``'s obs and uns and its obsm entries added.

    The count matrix is never read. Written beside the target and renamed into place, so a failure
    leaves no partial file.
    """
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(source, partial)
        with h5py.File(partial, "r+") as store:
            write_elem(store, "obs", adata.obs)
            write_elem(store, "uns", dict(adata.uns))
            obsm = store.require_group("obsm")
            for key, value in adata.obsm.items():
                if key in obsm:
                    del obsm[key]
                write_elem(obsm, key, value)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _read_annotations(path: Path) -> ad.AnnData:
    """``.obs`` and ``.uns`` of an ``.h5ad`` file, without its matrices."""
    import h5py

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    try:  # an encoding this anndata cannot read: an error naming the file, not a traceback
        with h5py.File(path, "r") as store:
            obs = read_elem(store["obs"])
            uns = read_elem(store["uns"]) if "uns" in store else {}
    except Exception as err:
        raise ValueError(f"cannot read .obs/.uns of {str(path)!r}: {type(err).__name__}: {err}") from err
    return ad.AnnData(obs=obs, uns=uns)


def _check_input_keys(source: Path, layer: str | None, gene_key: str | None) -> None:
    """Raise if the input of ``embed``/``predict`` lacks ``layer`` or the ``gene_key`` column, naming the flag."""
    try:
        with h5py.File(source, "r") as file:
            check_h5ad_layout(file, source)
            layers = list(file["layers"]) if "layers" in file else []
            columns = var_columns(file["var"]) if "var" in file else []
    except OSError as err:
        raise ValueError(f"cannot read {str(source)!r}: {err}") from err
    if layer is not None:
        check_layer(source, layers, layer, fix="name the input's layer of raw counts with --layer (X: .X)")
    if gene_key is not None:
        check_gene_column(
            source,
            columns,
            gene_key,
            fix="name the .var column with the model's kind of gene identifiers with --gene-key "
            "(var_names: the var names)",
        )


def _apply(args: argparse.Namespace, tool: str) -> Path:
    """Embed or predict the cells of an ``.h5ad`` file, its counts read from disk in row blocks."""
    import sctransformer as sct

    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise FileNotFoundError(f"input file {str(source)!r} does not exist")
    if source.suffix != ".h5ad" or target.suffix != ".h5ad":
        raise ValueError("--input and --output must be .h5ad files")
    # every check of the output before the model is loaded: else a bad path fails after the model ran
    if target.is_dir():  # --overwrite cannot replace a directory with the file
        raise IsADirectoryError(f"output {str(target)!r} is a directory; choose a file path")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"the directory of output {str(target)!r} does not exist; create it or choose another path"
        )
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"output {str(target)!r} exists; pass --overwrite or choose another path")
    if target.resolve() == source.resolve():
        raise ValueError("--output must differ from --input: the input file is never changed")
    if tool == "embed" and (not args.key_added or "/" in args.key_added or args.key_added in (".", "..")):
        raise ValueError(
            f"--key-added must be a non-empty .obsm key without '/', and not '.' or '..' (HDF5 reads "
            f"those as groups), got {args.key_added!r}"
        )
    model = sct.GeneTransformer.load(args.model)
    layer = model.setup_args_["layer"] if args.layer is None else (None if args.layer == "X" else args.layer)
    gene_key = (
        model.setup_args_["gene_key"]
        if args.gene_key is None
        else (None if args.gene_key == "var_names" else args.gene_key)
    )
    _check_input_keys(source, layer, gene_key)
    counts = sct.data.ShardedAnnData([source], layer=layer, gene_key=gene_key, join="outer")
    annotations = _read_annotations(source)
    try:
        if tool == "embed":
            sct.tl.embed(
                annotations,
                model,
                key_added=args.key_added,
                pooling=args.pooling,
                batch_size=args.batch_size,
                counts=counts,
            )
        else:
            sct.tl.predict(
                annotations,
                model,
                min_confidence=args.min_confidence,
                batch_size=args.batch_size,
                counts=counts,
            )
    except ValueError as err:  # the Python argument's advice, as the flag that sets it here
        if GENE_KEY_FIX not in str(err):
            raise
        raise ValueError(
            str(err).replace(
                GENE_KEY_FIX,
                "name the .var column with matching identifiers with --gene-key (var_names for the var names)",
            )
        ) from None
    _write_results(source, target, annotations)
    return target


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sctransformer", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_, config_help in (
        ("pretrain", "train a model from a config file", "YAML or JSON config file"),
        (
            "finetune",
            "train a saved model further (e.g. new phenotype heads) from a config file",
            "YAML or JSON config file with a 'reference' model",
        ),
    ):
        p = commands.add_parser(
            name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("--config", required=True, help=config_help)
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    for name, help_ in (
        ("embed", "write cell embeddings to .obsm"),
        ("predict", "write predicted phenotypes to .obs"),
    ):
        p = commands.add_parser(name, help=help_)
        p.add_argument("--model", required=True, help="directory of a saved model")
        p.add_argument("--input", required=True, help=".h5ad file with raw counts")
        p.add_argument(
            "--layer",
            default=None,
            help="layer of the input holding raw counts; X reads .X (default: the model's layer)",
        )
        p.add_argument(
            "--gene-key",
            default=None,
            help=".var column of the input with the model's kind of gene identifiers; var_names reads "
            "the var names (default: the model's gene_key)",
        )
        p.add_argument(
            "--output", required=True, help=".h5ad file to write (a copy of the input with the results)"
        )
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        if name == "embed":
            p.add_argument("--key-added", default="X_sct")
            p.add_argument("--pooling", choices=["profile", "cls", "mean"], default=None)
        else:
            p.add_argument("--min-confidence", type=float, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments, config or input; 1 where the loss diverged)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("pretrain", "finetune"):
            out = pretrain(args.config, overwrite=args.overwrite, command=args.command)
        else:
            out = _apply(args, args.command)
    except FloatingPointError as err:  # the loss diverged: the run's own failure, not the config's
        print(f"sctransformer {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, KeyError, OSError, MisconfigurationException) as err:
        # MisconfigurationException: a Trainer setting Lightning refuses (e.g. accelerator: gpu
        # on a machine without one), raised before training
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sctransformer {args.command}: error: {message}", file=sys.stderr)
        return 2
    if _global_rank() == 0:  # one line per run, not one per distributed process
        print(json.dumps({"command": args.command, "output": str(out)}))
    return 0


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
