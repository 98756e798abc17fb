"""The package's on/off run-time switches (T2T_ONEDNN, T2T_RECOMPUTE_PAIRS, ...), read by one parser: every variable
takes the same spellings, and one it cannot read is an error that names it (before, anything but "0" meant on, so
T2T_ONEDNN=false turned oneDNN on). csrc/cpu/onednn_linear.h reads T2T_ONEDNN the same way."""
from __future__ import annotations

import os

OFF = ("0", "false", "off", "no")
ON = ("1", "true", "on", "yes")


def env_flag(name: str, default: bool) -> bool:
    """os.environ[name] as a switch: unset or empty, default; 0/false/off/no, False; 1/true/on/yes, True (any case,
    surrounding spaces ignored); anything else a ValueError naming the variable."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in OFF:
        return False
    if value in ON:
        return True
    raise ValueError(f"{name} must be one of {'/'.join(OFF)} (off) or {'/'.join(ON)} (on), or unset; "
                     f"got {os.environ[name]!r}")
