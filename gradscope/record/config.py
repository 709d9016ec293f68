"""The profile options, defined once: the CLI declares them, ``profile`` runs them, compare's arms rebuild them.

Torch-free: ``gradscope.cli`` and ``gradscope.compare`` import this module without paying for torch.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

#: Steps per part file; a killed run keeps everything up to its last part.
DEFAULT_FLUSH_EVERY = 100
#: Parts are also at least this many seconds apart (fewer, larger files on fast loops).
DEFAULT_FLUSH_SECONDS = 2.0


@dataclass(frozen=True)
class Thresholds:
    """A clipping threshold per optimizer: ``X`` for every optimizer, or ``X/Y/...`` by optimizer index.

    The index is the one ``gradscope recommend`` shows for each optimizer (the order in which the
    script's optimizers first stepped). An optimizer past the end of a ``X/Y`` list is not clipped.
    """

    values: tuple[float, ...]
    for_all: bool  # True: values holds one threshold that applies to every optimizer

    def of(self, optimizer: int) -> float | None:
        """The threshold of optimizer ``optimizer``, or None when it is not clipped."""
        if self.for_all:
            return self.values[0]
        return self.values[optimizer] if optimizer < len(self.values) else None

    def text(self) -> str:
        """The option's text for these thresholds (``1`` or ``1/5``), as :func:`parse_thresholds` reads it."""
        return "/".join(f"{v!r}" for v in self.values)

    @classmethod
    def every(cls, value: float) -> Thresholds:
        """One threshold for every optimizer."""
        return cls((float(value),), True)

    @classmethod
    def per_optimizer(cls, values: list[float]) -> Thresholds:
        """One threshold per optimizer index (a single value still means optimizer 0 only)."""
        return cls(tuple(float(v) for v in values), False)


def parse_thresholds(text: str, option: str = "--max-norm") -> Thresholds:
    """Read ``X`` (every optimizer) or ``X/Y/...`` (one per optimizer index): positive finite numbers.

    Raises:
        ValueError: with a one-line message naming ``option`` and the bad item.
    """
    items = [item.strip() for item in str(text).split("/")]
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{option} takes a positive number, or one per optimizer separated by '/' "
                             f"(e.g. 1.0/5.0); {item!r} is not a positive finite number")
        values.append(value)
    return Thresholds.every(values[0]) if len(values) == 1 else Thresholds.per_optimizer(values)


def parse_clip_value(text: str, option: str = "--clip-value") -> float:
    """Read one positive finite number (``clip_grad_value_``'s ``clip_value``, the same for every optimizer).

    Raises:
        ValueError: with a one-line message naming ``option`` and the bad value.
    """
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} takes one positive number (clip_grad_value_'s clip_value); "
                         f"{str(text).strip()!r} is not a positive finite number")
    return value


#: torch.manual_seed's range: a seed outside it raises inside torch.
SEED_MIN, SEED_MAX = -0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF


def check_profile_options(options: ProfileOptions) -> None:
    """Check every profile option before the script runs.

    Raises:
        ValueError: with a one-line message naming the option and the bad value.
    """
    rec = options.recording
    if rec.seed is not None and not SEED_MIN <= rec.seed <= SEED_MAX:
        raise ValueError(f"--seed takes an integer from {SEED_MIN} to {SEED_MAX} (torch.manual_seed's range); "
                         f"{rec.seed} is outside it")
    if rec.flush_every < 1:
        raise ValueError(f"--flush-every takes a positive number of steps; {rec.flush_every} is not")
    if rec.max_steps is not None and rec.max_steps < 1:
        raise ValueError(f"--max-steps takes a positive number of steps; {rec.max_steps} is not")
    if rec.max_time is not None and not (math.isfinite(rec.max_time) and rec.max_time >= 0):
        raise ValueError(f"--max-time takes a finite number of seconds, 0 or more; {rec.max_time} is not")
    label = options.label
    if label is not None and (not label.strip() or any(c in label for c in "/\\\0") or label in (".", "..")):
        raise ValueError(f"--label names the run: a non-empty name without path separators; {label!r} is not")
    if options.runs_dir is not None:
        root = os.path.expanduser(os.fspath(options.runs_dir))
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f"--runs-dir {options.runs_dir} is a file, not a directory")


@dataclass
class RecorderConfig:
    """What to record and how; every field but ``flush_seconds`` has a ``gradscope profile`` option."""

    flush_every: int = DEFAULT_FLUSH_EVERY  # steps per part file (also at least flush_seconds apart)
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    inject_max_norm: Thresholds | None = None  # --max-norm: clip_grad_norm_ before every step (compare's arms)
    inject_clip_value: float | None = None  # --clip-value: clip_grad_value_ before every step (compare's arms)
    disable_script_clip: bool = False  # --no-clip: the script's clip calls measure, never scale
    seed: int | None = None  # --seed: replaces the argument of every torch.manual_seed call
    max_steps: int | None = None  # --max-steps: stop cleanly after this many steps of optimizer 0
    max_time: float | None = None  # --max-time: stop cleanly at the first step after this many seconds

    def __post_init__(self) -> None:
        # A bare number still means one threshold for every optimizer (the Python API's older form).
        if isinstance(self.inject_max_norm, int | float):
            self.inject_max_norm = Thresholds.every(float(self.inject_max_norm))

    @property
    def injecting(self) -> bool:
        """True when gradscope clips before every step (``--max-norm`` or ``--clip-value``)."""
        return self.inject_max_norm is not None or self.inject_clip_value is not None


@dataclass
class ProfileOptions:
    """Everything ``gradscope profile`` was asked to do: the target, where the run goes, and how to record."""

    target: str
    args: list[str] = field(default_factory=list)
    as_module: bool = False
    runs_dir: str | os.PathLike[str] | None = None
    label: str | None = None
    quiet: bool = False
    recording: RecorderConfig = field(default_factory=RecorderConfig)

    def command(self) -> list[str]:
        """The ``python -m gradscope profile ...`` command line that asks for exactly these options."""
        rec = self.recording
        flags: list[str] = ["-q"] if self.quiet else []
        if self.runs_dir is not None:
            flags += ["--runs-dir", str(self.runs_dir)]
        if self.label is not None:
            flags += ["--label", self.label]
        if rec.flush_every != DEFAULT_FLUSH_EVERY:
            flags += ["--flush-every", str(rec.flush_every)]
        if rec.seed is not None:
            flags += ["--seed", str(rec.seed)]
        if rec.inject_max_norm is not None:
            flags += ["--max-norm", rec.inject_max_norm.text()]
        if rec.inject_clip_value is not None:
            flags += ["--clip-value", repr(rec.inject_clip_value)]
        if rec.disable_script_clip and not rec.injecting:  # injection replaces the script's clipping anyway
            flags += ["--no-clip"]
        if rec.max_steps is not None:
            flags += ["--max-steps", str(rec.max_steps)]
        if rec.max_time is not None:
            flags += ["--max-time", repr(rec.max_time)]
        # -m must be profile's last option: everything after the target belongs to the script.
        target = ["-m", self.target] if self.as_module else [self.target]
        return [sys.executable, "-m", "gradscope", "profile", *flags, *target, *self.args]


def config_to_json(config: RecorderConfig) -> dict[str, object]:
    """``config`` as plain JSON values (the ``config`` of ``GRADSCOPE_JOB``); :func:`config_from_json` reads it."""
    norm = config.inject_max_norm
    return {"flush_every": config.flush_every, "flush_seconds": config.flush_seconds,
            "inject_max_norm": None if norm is None else {"values": list(norm.values), "for_all": norm.for_all},
            "inject_clip_value": config.inject_clip_value, "disable_script_clip": config.disable_script_clip,
            "seed": config.seed, "max_steps": config.max_steps, "max_time": config.max_time}


def config_from_json(data: dict[str, object]) -> RecorderConfig:
    """The :class:`RecorderConfig` that :func:`config_to_json` wrote; unknown keys are ignored."""
    known = {name: data[name] for name in RecorderConfig.__dataclass_fields__ if name in data}
    norm = known.get("inject_max_norm")
    if isinstance(norm, dict):
        known["inject_max_norm"] = Thresholds(tuple(float(v) for v in norm["values"]), bool(norm["for_all"]))
    return RecorderConfig(**known)  # type: ignore[arg-type]
