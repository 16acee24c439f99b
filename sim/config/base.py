"""What every config section shares: the `Section` base model and the `ConfigError` it raises.

Sections are strict, frozen pydantic models that forbid unknown keys and non-finite floats, so a
typo or a YAML string where a number belongs is an error naming its key path. `SHORT` is the
bounded `reprlib` used to show an offending value (a hostile YAML document can nest a list 9^9
deep cheaply; showing it must not cost that).
"""

from __future__ import annotations

import reprlib

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A bad config value; the message names the key path and the expectation."""


class Section(BaseModel):
    # strict: a YAML string "5" for an int field is an error, not silently coerced; .nan/.inf are
    # never a setting (YAML reads 1.0e+999 as inf).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


SHORT = reprlib.Repr()
SHORT.maxlevel, SHORT.maxlist, SHORT.maxstring, SHORT.maxother, SHORT.maxlong = 2, 4, 40, 40, 40
