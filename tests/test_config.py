"""Flat options -> typed dataclass configs, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fedrec.config import build_config, load_toml, parse_assignments
from fedrec.errors import ConfigError


@dataclass
class Example:
    layers: int = 2
    rate: float = 0.5
    name: str = "a"
    on: bool = False


def test_kebab_and_snake_keys_and_string_values_are_parsed():
    cfg = build_config(Example, {"layers": "3", "rate": 1, "name": "b", "on": "yes"})
    assert cfg == Example(layers=3, rate=1.0, name="b", on=True)


def test_unknown_key_lists_known_ones_and_wrong_types_fail():
    with pytest.raises(ConfigError, match="unknown option 'layer' .*known: layers, name, on, rate"):
        build_config(Example, {"layer": 1}, where="model 'x'")
    with pytest.raises(ConfigError, match="'layers' must be of type int"):
        build_config(Example, {"layers": "two"})
    with pytest.raises(ConfigError, match="'on' must be of type bool"):
        build_config(Example, {"on": "maybe"})
    with pytest.raises(ConfigError, match="must be of type int"):
        build_config(Example, {"layers": True})


def test_fixed_values_cannot_be_overridden():
    assert build_config(Example, {}, name="fixed").name == "fixed"
    with pytest.raises(ConfigError, match="unknown option 'name'"):
        build_config(Example, {"name": "x"}, name="fixed")


def test_assignments_and_toml(tmp_path):
    assert parse_assignments(["a=1", "b-c = x=y"]) == {"a": 1, "b-c": "x=y"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignments(["novalue"])
    good = tmp_path / "c.toml"
    good.write_text('[model]\ndim = 16\n')
    assert load_toml(good) == {"model": {"dim": 16}}
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
