"""meta.json as a type: :class:`RunMeta` and its parts, checked field by field when read.

This module holds the keys of meta.json and nothing about where files live (that is
:mod:`gradscope.store`, which reads and writes meta.json through :meth:`RunMeta.from_json` and
:meth:`RunMeta.to_json`). On disk meta.json is one flat JSON object, as gradscope 0.1.0 wrote it;
in Python the provenance, the clipping and each optimizer are their own frozen dataclasses.

Only ``format``, ``schema_version`` and ``status`` are required: a run recorded through the
``Recorder`` API has no provenance, and a run written by another tool through the store API may
name nothing but its status. Every field that is present must have its documented type.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from gradscope.errors import RunFormatError

#: Bump on any change to the tables' columns or to meta.json's keys, and say what changed here.
#: Additive changes that every reader of the version reads (a key or column that may be absent) keep it.
#: 1: first release; since then, optional: provenance executable/launcher, clipping's injected_max_norms,
#: injected_clip_value, script_clip_value and injection, optimizers' n_evaluations, norm_scope and shard_weights, the
#: layers' max_abs column, the steps' shard_sq and whole_sq columns, meta's incomplete, a distributed job's rank,
#: local_rank, world_size and launch.
SCHEMA_VERSION = 1
FORMAT_NAME = "gradscope-run"
#: What meta.json's ``status`` may say. A reader adds ``killed`` (see ``store.Run.status``).
STATUSES = ("running", "complete", "failed", "interrupted")


def check_version(path: Path, version: Any, writer: str) -> None:
    """Refuse a file without an integer schema version, or written by a newer schema, naming both versions."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunFormatError(f"{path} has no valid schema version; it was not written by gradscope")
    if version > SCHEMA_VERSION:
        raise RunFormatError(
            f"{path} was written by gradscope {writer} (schema {version}); "
            f"this gradscope reads schema {SCHEMA_VERSION} and older: upgrade gradscope to read it"
        )


class MetaFieldError(ValueError):
    """A meta.json field is missing or has the wrong type; the message names the field."""


class Kind(NamedTuple):
    """What a field may hold: a test on the JSON value, its description, and the Python value it becomes."""

    text: str
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the integer 1


def optional(kind: Kind) -> Kind:
    """``kind`` or JSON null (None)."""
    return Kind(f"{kind.text} or null", lambda v: v is None or kind.test(v),
                lambda v: None if v is None else kind.convert(v))


def list_of(kind: Kind, text: str) -> Kind:
    """A JSON list whose every item is ``kind``; a tuple in Python (meta is read-only)."""
    return Kind(text, lambda v: isinstance(v, list) and all(kind.test(x) for x in v),
                lambda v: tuple(kind.convert(x) for x in v))


STR = Kind("a string", lambda v: isinstance(v, str))
INT = Kind("an integer", _is_int)
NUMBER = Kind("a number", lambda v: _is_int(v) or isinstance(v, float), float)
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
STATUS = Kind(f"one of {', '.join(STATUSES)}", lambda v: v in STATUSES)
STRINGS = list_of(STR, "a list of strings")
INTS = list_of(INT, "a list of integers")
SHAPES = list_of(INTS, "a list of shapes (lists of integers)")
ALIASES = Kind("an object of lists of strings",
               lambda v: isinstance(v, dict) and all(STRINGS.test(x) for x in v.values()),
               lambda v: {str(k): STRINGS.convert(x) for k, x in v.items()})
ANY = Kind("anything", lambda v: True)
THRESHOLDS = list_of(optional(NUMBER), "a list of numbers or nulls")
#: How an optimizer's norms combine across the ranks of a job (see docs/distributed.md).
NORM_SCOPES = ("global", "sharded", "rank-local")
NORM_SCOPE = Kind(f"one of {', '.join(NORM_SCOPES)}", lambda v: v in NORM_SCOPES)
SHARD_WEIGHTS = list_of(optional(Kind("0 or 1", lambda v: _is_int(v) and v in (0, 1))), "a list of 0, 1 or null")
_REQUIRED: Any = object()


class Fields:
    """One JSON object of meta.json, read field by field; a bad field raises :class:`MetaFieldError`."""

    def __init__(self, data: Any, name: str = "") -> None:
        if not isinstance(data, dict):
            raise MetaFieldError(f"meta.json {'field ' + name if name else 'top level'} must be an object, "
                                 f"not {_shown(data)}")
        self.data, self.prefix = data, f"{name}." if name else ""

    def take(self, key: str, kind: Kind, default: Any = _REQUIRED) -> Any:
        """The value of ``key`` converted to Python; ``default`` when absent (no default: required)."""
        if key not in self.data:
            if default is _REQUIRED:
                raise MetaFieldError(f"meta.json field {self.prefix}{key} is missing")
            return default
        value = self.data[key]
        if not kind.test(value):
            raise MetaFieldError(f"meta.json field {self.prefix}{key} must be {kind.text}, not {_shown(value)}")
        return kind.convert(value)


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Provenance:
    """What ``gradscope profile`` ran, so that ``compare`` can run it again."""

    target: str  # the script path or module name, as given
    as_module: bool
    script_path: str  # the file that ran (a module's resolved file)
    script_sha256: str | None  # None when the target is not a plain file
    argv: tuple[str, ...]  # sys.argv as the script saw it
    script_args: tuple[str, ...]
    cwd: str
    command: tuple[str, ...]  # the gradscope command line that recorded the run
    executable: str | None = None  # sys.executable of the profiled process (None: recorded before it was kept)
    launcher: str | None = None  # how gradscope was started: "python -m gradscope" or the console script's path

    KEYS = ("target", "as_module", "script_path", "script_sha256", "argv", "script_args", "cwd", "command",
            "executable", "launcher")

    @classmethod
    def read(cls, fields: Fields) -> Provenance | None:
        """The provenance in meta.json's top level, or None for a run recorded without ``gradscope profile``."""
        if "target" not in fields.data:
            return None
        take = fields.take
        return cls(take("target", STR), take("as_module", BOOL), take("script_path", STR),
                   take("script_sha256", optional(STR), None), take("argv", STRINGS),
                   take("script_args", STRINGS), take("cwd", STR), take("command", STRINGS),
                   take("executable", optional(STR), None), take("launcher", optional(STR), None))

    def to_json(self) -> dict[str, Any]:
        """The provenance keys of meta.json (``executable`` and ``launcher`` only when known)."""
        return {key: _plain(getattr(self, key)) for key in self.KEYS
                if key not in ("executable", "launcher") or getattr(self, key) is not None}


@dataclass(frozen=True)
class Clipping:
    """The clipping in effect: the script's own (as last seen) and what gradscope injected, and whether it could."""

    script_max_norm: float | None = None  # max_norm of the script's last norm clipping call
    script_clip_function: str | None = None  # e.g. "clip_grad_norm_"
    script_clip_calls: int = 0
    injected_max_norm: float | None = None  # ``--max-norm X``: the one threshold for every optimizer, else None
    script_clip_disabled: bool = False  # ``--no-clip``: the script's calls measured, not applied
    injected_max_norms: tuple[float | None, ...] = ()  # per optimizer slot index: the max_norm injected (None: none)
    injected_clip_value: float | None = None  # ``--clip-value``: clip_grad_value_ injected before every step
    script_clip_value: float | None = None  # clip_value of the script's last clip_grad_value_ call
    injection: str | None = None  # None (nothing asked), "applied", or "not injected: <reason>"

    @classmethod
    def read(cls, fields: Fields) -> Clipping:
        """Read the ``clipping`` object (every key optional)."""
        take = fields.take
        return cls(take("script_max_norm", optional(NUMBER), None), take("script_clip_function", optional(STR), None),
                   take("script_clip_calls", INT, 0), take("injected_max_norm", optional(NUMBER), None),
                   take("script_clip_disabled", BOOL, False), take("injected_max_norms", THRESHOLDS, ()),
                   take("injected_clip_value", optional(NUMBER), None), take("script_clip_value", optional(NUMBER), None),
                   take("injection", optional(STR), None))

    #: Keys added after the first release: written only when they say something (a 0.1.0 run reads back the same).
    ADDED = {"injected_max_norms": (), "injected_clip_value": None, "script_clip_value": None, "injection": None}

    def to_json(self) -> dict[str, Any]:
        """The ``clipping`` object of meta.json."""
        return {key: _plain(value) for key, value in self.__dict__.items()
                if key not in self.ADDED or value != self.ADDED[key]}


@dataclass(frozen=True)
class OptimizerMeta:
    """One optimizer slot: the ``optimizer`` column of the tables indexes these."""

    index: int
    class_name: str  # "class" in meta.json: the optimizer's class, or "manual" for a hand-written update
    names: tuple[str, ...] = ()  # parameter names, in the optimizer's order
    shapes: tuple[tuple[int, ...], ...] = ()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> other names of the same tensor
    n_evaluations: int = 0  # closure calls over the run (LBFGS re-evaluates in its line search); 0: no closure
    # A rank of a distributed job: "global" (every rank holds the whole gradients), "sharded" (combine the ranks'
    # pieces by shard_weights) or "rank-local" (no combination is possible). None: a single-process run (global).
    norm_scope: str | None = None
    # Aligned with names: 1 = this rank's piece of a sharded tensor counts, 0 = a duplicate piece, None = whole.
    shard_weights: tuple[int | None, ...] | None = None

    @property
    def n_tensors(self) -> int:
        """How many parameter tensors the optimizer updates."""
        return len(self.names)

    @classmethod
    def read(cls, fields: Fields) -> OptimizerMeta:
        """Read one entry of ``optimizers`` (``index`` and ``class`` required)."""
        take = fields.take
        take("n_tensors", INT, 0)  # checked, not kept: it is len(names)
        return cls(take("index", INT), take("class", STR), take("names", STRINGS, ()),
                   take("shapes", SHAPES, ()), take("aliases", ALIASES, {}), take("n_evaluations", INT, 0),
                   take("norm_scope", optional(NORM_SCOPE), None), take("shard_weights", optional(SHARD_WEIGHTS), None))

    def to_json(self) -> dict[str, Any]:
        """The entry of meta.json's ``optimizers`` list."""
        return {"index": self.index, "class": self.class_name, "n_tensors": self.n_tensors, "names": list(self.names),
                "shapes": _plain(self.shapes), "aliases": {k: list(v) for k, v in self.aliases.items()},
                **({"n_evaluations": self.n_evaluations} if self.n_evaluations else {}),
                **({"norm_scope": self.norm_scope} if self.norm_scope is not None else {}),
                **({"shard_weights": list(self.shard_weights)} if self.shard_weights is not None else {})}


@dataclass(frozen=True)
class Launch:
    """How a distributed job was started, so that ``compare`` can start its arms the same way."""

    via: str  # "gradscope" (profile --nproc-per-node), "torchrun" (torchrun -m gradscope profile) or "script"
    nproc_per_node: int | None = None
    launcher_args: tuple[str, ...] = ()  # torchrun's options, without the script and its arguments

    VIA = ("gradscope", "torchrun", "script")

    @classmethod
    def read(cls, fields: Fields) -> Launch:
        """Read the ``launch`` object."""
        take = fields.take
        return cls(take("via", Kind(f"one of {', '.join(cls.VIA)}", lambda v: v in cls.VIA)),
                   take("nproc_per_node", optional(INT), None), take("launcher_args", STRINGS, ()))

    def to_json(self) -> dict[str, Any]:
        """The ``launch`` object of meta.json."""
        return {"via": self.via, "nproc_per_node": self.nproc_per_node, "launcher_args": list(self.launcher_args)}


@dataclass(frozen=True)
class RunMeta:
    """Everything meta.json says about a run. Read it with :meth:`from_json`, write it with :meth:`to_json`."""

    status: str  # running | complete | failed | interrupted
    gradscope_version: str | None = None
    torch_version: str | None = None
    python_version: str | None = None
    run_id: str | None = None
    label: str | None = None
    provenance: Provenance | None = None  # None: recorded through the Recorder API, not ``gradscope profile``
    seed: int | None = None  # the first torch.manual_seed of the run (``--seed`` when given)
    seeds_seen: tuple[int, ...] = ()  # the first 20 torch.manual_seed arguments
    norm_type: float = 2.0
    clipping: Clipping = field(default_factory=Clipping)
    optimizers: tuple[OptimizerMeta, ...] = ()
    flush_every: int | None = None
    start_time: str | None = None  # ISO 8601, UTC
    end_time: str | None = None
    exit_code: int | None = None
    error: str | None = None  # "ExceptionType: message" of a failed run
    incomplete: str | None = None  # why the recording lacks data although the script ran (a failed write)
    n_steps: int | None = None  # rows recorded, over all optimizers
    host: str | None = None
    pid: int | None = None
    rank: int | None = None  # a rank of a distributed job: its global rank (the rank's own meta.json)
    local_rank: int | None = None
    world_size: int | None = None
    launch: Launch | None = None  # a distributed job's meta.json: how it was started
    format: str = FORMAT_NAME
    schema_version: int = SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    #: Top-level keys read into plain fields, and their kinds.
    SCALARS = {"gradscope_version": optional(STR), "torch_version": optional(STR), "python_version": optional(STR),
               "run_id": optional(STR), "label": optional(STR), "seed": optional(INT), "seeds_seen": INTS,
               "norm_type": NUMBER, "flush_every": optional(INT), "start_time": optional(STR),
               "end_time": optional(STR), "exit_code": optional(INT), "error": optional(STR),
               "n_steps": optional(INT), "host": optional(STR), "pid": optional(INT),
               "incomplete": optional(STR), "rank": optional(INT), "local_rank": optional(INT),
               "world_size": optional(INT)}
    #: Keys written only when they say something (a single-process run reads back as gradscope 0.1.0 wrote it).
    WHEN_SET = ("incomplete", "rank", "local_rank", "world_size")

    @classmethod
    def from_json(cls, data: Any) -> RunMeta:
        """Check and convert meta.json's parsed JSON.

        Raises:
            MetaFieldError: a field is missing or has the wrong type (the message names it).
        """
        fields = Fields(data)
        values = {key: fields.take(key, kind, None) for key, kind in cls.SCALARS.items() if key in data}
        optimizers = fields.take("optimizers", list_of(ANY, "a list"), ())
        known = {*cls.SCALARS, *Provenance.KEYS, "format", "schema_version", "status", "clipping", "optimizers",
                 "launch"}
        launch = data.get("launch")
        values["launch"] = None if launch is None else Launch.read(Fields(launch, "launch"))
        return cls(status=fields.take("status", STATUS), provenance=Provenance.read(fields),
                   clipping=Clipping.read(Fields(data.get("clipping", {}), "clipping")),
                   optimizers=tuple(OptimizerMeta.read(Fields(entry, f"optimizers[{k}]"))
                                    for k, entry in enumerate(optimizers)),
                   format=fields.take("format", STR), schema_version=fields.take("schema_version", INT),
                   extra={k: v for k, v in data.items() if k not in known}, **values)

    def to_json(self) -> dict[str, Any]:
        """meta.json's JSON object: flat, in the order gradscope has always written it."""
        head = {"format": self.format, "schema_version": self.schema_version}
        for key in ("gradscope_version", "torch_version", "python_version", "run_id", "label"):
            head[key] = getattr(self, key)
        tail = {key: _plain(getattr(self, key)) for key in self.SCALARS if key not in head}
        for key in self.WHEN_SET:
            if tail[key] is None:
                del tail[key]
        if self.launch is not None:
            tail["launch"] = self.launch.to_json()
        tail["clipping"] = self.clipping.to_json()
        tail["optimizers"] = [o.to_json() for o in self.optimizers]
        tail["status"] = self.status
        order = ("seed", "seeds_seen", "norm_type", "clipping", "optimizers", "flush_every", "start_time",
                 "end_time", "status", "exit_code", "error", "n_steps", "host", "pid", "incomplete", "rank",
                 "local_rank", "world_size", "launch")
        provenance = self.provenance.to_json() if self.provenance is not None else {}
        return {**head, **provenance, **{key: tail[key] for key in order if key in tail}, **self.extra}


def _plain(value: Any) -> Any:
    """Tuples (nested ones too) as JSON lists."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
