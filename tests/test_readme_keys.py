"""The README's config key table against the schema in gan_dist/config.py: every key is listed with its default,
and every allowed value of a key with a fixed set of choices (a `Literal` type) is named in its row."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from gan_dist.config import Config, choices

README = Path(__file__).resolve().parents[1] / "README.md"


def schema_defaults() -> dict[str, object]:
    """Every leaf key of the config tree -> its default (keys that follow another key show that key)."""
    def walk(node, prefix: str) -> dict[str, object]:
        out = {}
        for key in node.keys():
            name = prefix + key
            child = node._get_node(key)  # the node itself: a key that follows another shows its interpolation
            if OmegaConf.is_dict(child):
                out |= walk(child, name + ".")
            else:
                out[name] = child._value()
        return out
    return walk(OmegaConf.structured(Config), "")


def readme_rows() -> dict[str, tuple[str, str]]:
    """Every config key table (header `| key | default | meaning |`): key -> (its default as written, its row's
    meaning)."""
    rows, in_table = {}, False
    for line in README.read_text().splitlines():
        if line.startswith("| key | default | meaning |"):
            in_table = True
            continue
        if not in_table or line.startswith("| ---"):
            continue
        if not line.startswith("| `"):
            in_table = False
            continue
        keys, defaults, meaning = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        names = re.findall(r"`([A-Za-z_.0-9]+)`", keys)
        values = [v.strip() for v in defaults.split(", ")] if len(names) > 1 else [defaults]
        values = values * len(names) if len(values) == 1 else values  # one default shared by the row's keys
        assert len(values) == len(names), f"README row for {keys}: {len(names)} keys but defaults '{defaults}'"
        for name, value in zip(names, values):
            assert name not in rows, f"{name} is in the README's key tables twice"
            rows[name] = (value.strip("`"), meaning)
    return rows


def shown(value: object) -> str:
    """A default as the README writes it."""
    if isinstance(value, str) and value.startswith("${"):
        return "follows " + value[2:-1]
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "" or value == []:
        return "empty"
    return str(value)


def same(written: str, value: object) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(written.replace(",", "")) == float(value)
        except ValueError:
            return False
    return written == shown(value)


def test_every_schema_key_is_in_the_readme_with_its_default():
    rows, defaults = readme_rows(), schema_defaults()
    assert sorted(set(defaults) - set(rows)) == [], "keys missing from the README's table"
    assert sorted(set(rows) - set(defaults)) == [], "README keys the schema does not have"
    wrong = {k: (rows[k][0], shown(v)) for k, v in defaults.items() if not same(rows[k][0], v)}
    assert wrong == {}, "README default differs from the schema (README, schema)"


def test_every_choice_is_named_in_its_readme_row():
    rows = readme_rows()
    missing = {key: [c for c in allowed if f"`{shown(c)}`" not in rows[key][1] and shown(c) != rows[key][0]]
               for key in rows if (allowed := choices(key))}
    assert {k: v for k, v in missing.items() if v} == {}

