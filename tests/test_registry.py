import pytest
import torch
from torch import nn

import mechanisms
from mechanisms import Knob, RegistryError, register
from effbench.cases import Case, CaseError, expand


def test_builtins_registered_with_valid_families():
    assert {"dense", "sdpa"} <= set(mechanisms.REGISTRY)
    for spec in mechanisms.REGISTRY.values():
        assert spec.family in mechanisms.FAMILIES
        assert spec.complexity


def test_duplicate_name_refused():
    reg = {}

    @register(name="x", family="exact", complexity="O(1)", registry=reg)
    class A(nn.Module):
        def __init__(self, *, head_dim, heads, n, causal, seed):
            super().__init__()

    with pytest.raises(RegistryError, match="already registered"):
        @register(name="x", family="exact", complexity="O(1)", registry=reg)
        class B(A):
            pass


def test_bad_family_and_unaccepted_knob_refused():
    reg = {}
    with pytest.raises(RegistryError, match="family"):
        register(name="y", family="magic", complexity="O(1)", registry=reg)(nn.Module)

    with pytest.raises(RegistryError, match="does not accept"):
        @register(name="z", family="sparse", complexity="O(1)", knobs=[Knob("window", 4, axis="window")], registry=reg)
        class C(nn.Module):
            def __init__(self, *, head_dim, heads, n, causal, seed):
                super().__init__()


def test_unknown_mechanism_lists_choices():
    with pytest.raises(RegistryError, match="choose from: .*dense"):
        mechanisms.get("nope")


def test_knob_parse_and_range():
    k = Knob("window", 8, axis="window", minimum=1)
    assert k.parse("16") == 16
    with pytest.raises(RegistryError, match=">= 1"):
        k.parse("0")
    with pytest.raises(RegistryError, match="expects int"):
        k.parse("wide")
    c = Knob("impl", "eager", type=str, choices=("eager", "flex"))
    with pytest.raises(RegistryError, match="one of"):
        c.parse("cuda")


def test_build_is_deterministic_and_knobs_checked():
    spec = mechanisms.get("dense")
    m = spec.build(head_dim=8, heads=2, n=16, causal=True, seed=0)
    q, k, v = spec.make_inputs(batch=2, heads=2, n=16, head_dim=8, dtype=torch.float64)
    torch.testing.assert_close(m(q, k, v), m.reference(q, k, v))
    with pytest.raises(RegistryError, match="no knob"):
        spec.build(head_dim=8, heads=2, n=16, window=3)


def _toy_registry_specs():
    reg = {}

    @register(name="toy-window", family="sparse", complexity="O(N·W)",
              knobs=[Knob("window", 4, axis="window", minimum=1), Knob("impl", "eager", type=str, choices=("eager", "flex"))],
              registry=reg)
    class W(nn.Module):
        supports_causal = False
        causal_reason = "toy"

        def __init__(self, *, head_dim, heads, n, causal, seed, window, impl):
            super().__init__()

        @classmethod
        def check(cls, *, n, causal, heads, head_dim, device, dtype, window, impl):
            return [f"window {window} >= n {n}"] if window >= n else []

    return reg["toy-window"]


def test_unsupported_reasons():
    spec = _toy_registry_specs()
    assert spec.unsupported({"n": 16, "causal": False, "knobs": (("window", 4),)}) == []
    assert "toy" in spec.unsupported({"n": 16, "causal": True, "knobs": ()})[0]
    assert spec.unsupported({"n": 4, "causal": False, "knobs": {"window": 8}}) == ["window 8 >= n 4"]
    assert "one of" in spec.unsupported({"n": 16, "causal": False, "knobs": {"impl": "gpu"}})[0]


def test_knob_axes_routed_only_to_their_mechanism(monkeypatch):
    spec = _toy_registry_specs()
    monkeypatch.setitem(mechanisms.REGISTRY, spec.name, spec)
    cases = expand(["dense", "toy-window"], [64, 128], axes={"window": ["2", "8"]})
    dense = [c for c in cases if c.mechanism == "dense"]
    toy = [c for c in cases if c.mechanism == "toy-window"]
    assert len(dense) == 2 and all(c.knobs == () for c in dense)
    assert sorted((c.n, c.knob_dict["window"]) for c in toy) == [(64, 2), (64, 8), (128, 2), (128, 8)]
    with pytest.raises(CaseError, match="--rounds given but no selected mechanism"):
        expand(["dense"], [64], axes={"rounds": ["2"]})
    with pytest.raises(CaseError, match=">= 1"):
        expand(["toy-window"], [64], axes={"window": ["0"]})


def test_case_key_stable_and_validated():
    a = Case(mechanism="dense", n=512, knobs=(("b", 1), ("a", 2)))
    b = Case(mechanism="dense", n=512, knobs=(("a", 2), ("b", 1)))
    assert a.key == b.key and len(a.key) == 16
    assert Case(mechanism="dense", n=1024).key != a.key
    with pytest.raises(CaseError, match="positive"):
        Case(mechanism="dense", n=0)
    with pytest.raises(CaseError, match="dtype"):
        Case(mechanism="dense", n=8, dtype="float8")


def test_causal_only_mechanism_runs_causal_in_a_bidirectional_sweep():
    cases = expand(["transformer-xl", "linformer"], [256], causal=False)
    assert {c.mechanism: c.causal for c in cases} == {"transformer-xl": True, "linformer": False}
    # a causal sweep keeps linformer causal, and the mechanism says why it cannot run
    (lin,) = expand(["linformer"], [256], causal=True)
    assert lin.causal and "not causal" in mechanisms.get("linformer").unsupported(lin)[0]


def test_a_knob_given_at_its_default_is_the_same_case():
    """--window 256 (local's default) and no --window: one case, one key, so --resume never runs it twice."""
    explicit = expand(["local"], [512], axes={"window": [256, 128]})
    implicit = expand(["local"], [512])
    assert explicit[0].key == implicit[0].key and explicit[0].knobs == ()
    assert explicit[1].knobs == (("window", 128),) and explicit[1].key != implicit[0].key
    # the key of a default case is the one already in results/reference.csv (files written before keep resuming)
    assert implicit[0].key == "fff16a6e6df4e4df"


def test_bare_cuda_device_gets_its_index(monkeypatch):
    from effbench.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert resolve_device("cuda") == resolve_device("auto") == "cuda:2"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
