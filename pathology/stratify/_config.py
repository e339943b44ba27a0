"""Patient strata: a frozen, validated :class:`StrataConfig`, loaded from commented YAML.

A stratum is a name plus the p16 calls and CPS bins it admits; a key left out admits any value
(including a missing one). Patients take the FIRST stratum that admits them, in file order, so a
catch-all stratum belongs at the end; a patient no stratum admits has an empty stratum and the
flag ``no_stratum``. The default (``configs/strata.yaml``) is p16 call x CPS bin, nine strata,
with HPV-negative = p16-negative as the trial defines it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathology.errors import ConfigError
from pathology.stratify._problems import InputNotFoundError
from pathology.stratify._vocab import CPS_BINS, P16_CALLS

__all__ = ["StrataConfig", "Stratum", "load_strata"]

_TOP_KEYS = {"strata", "description"}
_STRATUM_KEYS = {"name", "p16", "cps_bin", "description"}
_P16_LABEL = {"negative": "p16-", "equivocal": "p16 equivocal", "positive": "p16+"}


@dataclass(frozen=True)
class Stratum:
    """One stratum.

    Parameters
    ----------
    name : str
        Unique label, used in ``patients.csv``, ``response.csv`` and the plots.
    p16 : tuple of str or None
        Patient p16 calls admitted (``negative``, ``equivocal``, ``positive``); ``None`` = any.
    cps_bin : tuple of str or None
        Patient CPS bins admitted (``<1``, ``1-19``, ``>=20``); ``None`` = any.
    description : str
        Free text for the report.
    """

    name: str
    p16: tuple[str, ...] | None = None
    cps_bin: tuple[str, ...] | None = None
    description: str = ""

    def admits(self, p16_call: str, cps_bin: str) -> bool:
        """Whether a patient with this p16 call and CPS bin (``""`` when missing) belongs here."""
        return (self.p16 is None or p16_call in self.p16) and (
            self.cps_bin is None or cps_bin in self.cps_bin
        )


@dataclass(frozen=True)
class StrataConfig:
    """An ordered tuple of strata and where they came from.

    Parameters
    ----------
    strata : tuple of Stratum
        In priority order: a patient takes the first stratum that admits it.
    source : str
        The YAML file, or ``"built-in default"``.
    description : str
    """

    strata: tuple[Stratum, ...]
    # Where a config came from does not change what it means: equality ignores it.
    source: str = field(default="built-in default", compare=False)
    description: str = ""

    def __post_init__(self) -> None:
        names = [s.name for s in self.strata]
        if not names:
            raise ConfigError(f"{self.source}: strata: needs at least one stratum")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{self.source}: strata: names must be unique, got {dupes} twice")

    @property
    def names(self) -> tuple[str, ...]:
        """Stratum names in priority order."""
        return tuple(s.name for s in self.strata)

    def assign(self, p16_call: str, cps_bin: str) -> str:
        """The name of the first stratum admitting the patient, or ``""`` when none does."""
        return next((s.name for s in self.strata if s.admits(p16_call, cps_bin)), "")

    @classmethod
    def default(cls) -> StrataConfig:
        """p16 call x CPS bin (nine strata), the trial's default; same as ``configs/strata.yaml``."""
        return cls(
            tuple(
                Stratum(f"{_P16_LABEL[p16]} / CPS {b}", (p16,), (b,))
                for p16 in P16_CALLS
                for b in CPS_BINS
            ),
            description="p16 call x PD-L1 CPS bin (22C3); HPV-negative = p16-negative",
        )

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> StrataConfig:
        """Validate a parsed YAML document.

        Raises
        ------
        ConfigError
            Unknown key, unknown p16 call or CPS bin, missing or repeated name; the message names
            ``source`` and the key (``strata[2].p16``).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping with a 'strata' list at the top")
        unknown = sorted(set(map(str, data)) - _TOP_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key {unknown[0]!r}; expected {', '.join(sorted(_TOP_KEYS))}"
            )
        items = data.get("strata")
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{source}: strata: expected a non-empty list of strata")
        strata = tuple(_stratum(item, f"strata[{i}]", source) for i, item in enumerate(items))
        return cls(strata, source, str(data.get("description") or ""))


def _stratum(item: Any, where: str, source: str) -> Stratum:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{source}: {where}: expected a mapping with name, p16, cps_bin")
    unknown = sorted(set(map(str, item)) - _STRATUM_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: {where}.{unknown[0]}: unknown key; expected "
            f"{', '.join(sorted(_STRATUM_KEYS))}"
        )
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: {where}.name: expected a non-empty text, got {name!r}")
    return Stratum(
        name.strip(),
        _values(item, "p16", P16_CALLS, where, source),
        _values(item, "cps_bin", CPS_BINS, where, source),
        str(item.get("description") or ""),
    )


def _values(
    item: Mapping[str, Any], key: str, allowed: tuple[str, ...], where: str, source: str
) -> tuple[str, ...] | None:
    if key not in item:
        return None
    raw = item[key]
    values = [raw] if isinstance(raw, str) else raw
    expected = f"expected a list of {', '.join(allowed)}"
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: {where}.{key}: {expected}, got {raw!r}")
    for v in values:
        if v not in allowed:
            raise ConfigError(f"{source}: {where}.{key}: unknown value {v!r}; {expected}")
    return tuple(values)


def load_strata(path: str | os.PathLike[str]) -> StrataConfig:
    """Load and validate a strata YAML file (see ``configs/strata.yaml``).

    Raises
    ------
    InputNotFoundError
        The file does not exist.
    ConfigError
        The YAML is malformed or does not follow the schema.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(path, "strata")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from None
    return StrataConfig.from_dict(data, os.fspath(path))
