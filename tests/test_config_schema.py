"""The typed-parameters helper: dotted names in every error, nested defaults, open mappings,
and config modules that load without torch."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from instseg_pipeline.config_schema import ConfigError, Schema, as_dict, build


@dataclass(frozen=True, kw_only=True)
class Inner:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    steps: tuple[int, ...] = (3, 6)


@dataclass(frozen=True, kw_only=True)
class Block(Schema):
    BLOCK = "block"

    path: str                                   # required: no default
    count: int = 2
    limit: int | None = None
    flag: bool = True
    mode: Literal["auto"] | bool = "auto"
    size: tuple[int, int] | None = None
    inner: Inner = field(default_factory=Inner)
    weights: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.count < 1:
            raise ConfigError("count", f"must be >= 1, got {self.count}")


def _error(params: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Block.from_params(params)
    return str(info.value)


def test_builds_nested_defaults_and_converts_lists():
    block = Block.from_params({"path": "p", "inner": {"lr": 1, "steps": [1, 2]},
                               "size": [4, 5], "weights": {"a": 2}, "mode": False,
                               "extra": {"anything": [1, {"x": None}]}})
    assert block.inner == Inner(lr=1.0, steps=(1, 2)) and isinstance(block.inner.lr, float)
    assert block.size == (4, 5) and block.weights == {"a": 2.0} and block.mode is False
    assert block.extra == {"anything": [1, {"x": None}]}  # open: taken as given
    assert Block.from_params({"path": "p", "inner": None}).inner == Inner()  # null block
    assert as_dict(block)["inner"] == {"name": "sgd", "lr": 1.0, "steps": [1, 2]}


def test_unknown_keys_name_the_dotted_path_and_the_known_keys():
    assert _error({"path": "p", "inner": {"lrr": 1}}) == (
        "block.inner.lrr: unknown key; known: lr, name, steps")
    assert _error({"path": "p", "countt": 1}).startswith("block.countt: unknown key; known: ")


@pytest.mark.parametrize(("params", "message"), [
    ({"count": "ten"}, "block.count: expected int, got 'ten'"),
    ({"count": True}, "block.count: expected int, got True"),  # a bool is not a number here
    ({"count": 2.5}, "block.count: expected int, got 2.5"),
    ({"limit": "x"}, "block.limit: expected int or null, got 'x'"),
    ({"flag": "yes"}, "block.flag: expected bool, got 'yes'"),
    ({"mode": "on"}, "block.mode: expected one of 'auto' or bool, got 'on'"),
    ({"size": [1]}, "block.size: expected a list of 2 (int, int) or null, got [1]"),
    ({"inner": {"name": "sgdd"}}, "block.inner.name: expected one of 'sgd', 'adamw', got 'sgdd'"),
    ({"inner": {"steps": [1, "b"]}}, "block.inner.steps[1]: expected int, got 'b'"),
    ({"inner": 3}, "block.inner: expected a mapping, got 3"),
    ({"weights": {"loss_a": "high"}}, "block.weights.loss_a: expected float, got 'high'"),
    ({"count": 0}, "block.count: must be >= 1, got 0"),
])
def test_mistyped_values_name_the_dotted_path_and_the_expected_type(params, message):
    assert _error({"path": "p", **params}) == message


def test_required_keys_and_non_mapping_blocks():
    assert _error({}) == "block.path: required key missing"
    with pytest.raises(ConfigError, match=r"^block: expected a mapping, got \[1\]$"):
        build(Block, [1], "block")


def test_config_modules_load_without_torch():
    """The ingestion and evaluation commands import the schemas; they must not pay for torch."""
    code = ("import sys\n"
            "import instseg_pipeline.data.config, instseg_pipeline.evaluation.config\n"
            "import instseg_pipeline.engine.config, instseg_pipeline.export.config\n"
            "print(sorted(m for m in ('torch', 'kedro') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
