"""mmgcs/models/registry.py: the name → builder table behind the towers and fusion heads."""

import pytest

from mmgcs.models.fusion import FUSIONS
from mmgcs.models.registry import Registry


def test_register_get_names_and_membership():
    heads = Registry("fusion head")

    @heads.register("sum")
    def build_sum(x):
        return ("sum", x)

    heads.register("concat")(lambda x: ("concat", x))
    assert build_sum(1) == ("sum", 1)  # the decorator gives the builder back unchanged
    assert heads.get("sum") is build_sum and heads.get("concat")(2) == ("concat", 2)
    assert heads.names() == ["concat", "sum"]
    assert "sum" in heads and "gated" not in heads


def test_an_unknown_name_lists_the_choices():
    heads = Registry("fusion head")
    heads.register("sum")(lambda: None)
    heads.register("concat")(lambda: None)
    with pytest.raises(ValueError, match=r"Unknown fusion head 'gated'; available: \['concat', 'sum'\]"):
        heads.get("gated")


def test_a_name_is_registered_once():
    heads = Registry("fusion head")
    first = heads.register("sum")(lambda: 1)
    with pytest.raises(ValueError, match="fusion head 'sum' is already registered"):
        heads.register("sum")(lambda: 2)
    assert heads.get("sum") is first


def test_the_project_registries_are_registries():
    assert isinstance(FUSIONS, Registry) and FUSIONS.names() and all(n in FUSIONS for n in FUSIONS.names())
