"""The merge methods as pure functions (hand-computed values) and the recipe schema."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.errors import ConfigError
from tunesmith.merging import methods as M
from tunesmith.merging.spec import candidate_name, evaluate_setting, load_merge_spec


def test_linear_weighted_average_and_unnormalised_sum():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.allclose(M.linear([a, b], None, weight=[1.0, 3.0]), (a + 3 * b) / 4)
    assert torch.allclose(M.linear([a, b], None, weight=[1.0, 3.0], normalize=False), a + 3 * b)


def test_task_arithmetic_adds_scaled_task_vectors():
    base = torch.tensor([1.0, 1.0])
    a, b = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    out = M.task_arithmetic([a, b], base, weight=[1.0, 0.5], lambda_=0.5)
    assert torch.allclose(out, base + 0.5 * (torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([0.0, 2.0])))


def test_ties_sign_election_and_disjoint_mean_by_hand():
    base = torch.zeros(4)
    a, b = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([-2.0, -2.0, 1.0, 0.1])
    # Density 1: majority signs of a + b = [+, -, +, +]; b's first entry disagrees and is left out.
    out = M.ties([a, b], base, weight=[1.0, 1.0], density=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([3.0, -1.5, 0.75, 1.05]))
    # Density 0.5 keeps a's 3 and 2, b's two -2s; a pruned entry never counts in the divisor.
    out = M.ties([a, b], base, weight=[1.0, 1.0], density=[0.5, 0.5])
    assert torch.allclose(out, torch.tensor([3.0, -2.0, 0.0, 2.0]))
    # Without normalisation the kept entries are summed.
    out = M.ties([a, b], base, weight=[1.0, 1.0], density=[1.0, 1.0], normalize=False)
    assert torch.allclose(out, torch.tensor([3.0, -3.0, 1.5, 2.1]))


def test_dare_keeps_density_share_rescaled_to_the_l1_norm_and_is_seeded():
    base = torch.zeros(20_000)
    delta = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    out = M.dare_linear([delta], base, weight=[1.0], density=[0.3], generator=g())
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    assert math.isclose(out.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-4)  # mergekit's L1 rescale
    assert torch.equal(out, M.dare_linear([delta], base, weight=[1.0], density=[0.3], generator=g()))
    no_rescale = M.dare_linear([delta], base, weight=[1.0], density=[0.3], rescale=False, generator=g())
    assert torch.equal(no_rescale != 0, out != 0) and no_rescale.abs().sum() < out.abs().sum()
    # Density 1 drops nothing: task arithmetic.
    assert torch.equal(M.dare_ties([delta], base, weight=[1.0], density=[1.0]), delta)


def test_breadcrumbs_drops_largest_gamma_and_smallest():
    base = torch.zeros(100)
    delta = torch.arange(1.0, 101.0)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    out = M.breadcrumbs([delta], base, weight=[1.0], density=[0.5], gamma=[0.1])
    kept = sorted(out[out != 0].tolist())
    assert kept == [float(v) for v in range(41, 91)]  # top 10 and bottom 40 dropped


def test_slerp_endpoints_orthogonal_midpoint_and_colinear_fallback():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(M.slerp([e2], e1, t=0.0), e1)
    assert torch.allclose(M.slerp([e2], e1, t=1.0), e2)
    assert torch.allclose(M.slerp([e2], e1, t=0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # Colinear tensors: the angle is undefined, so it interpolates linearly.
    assert torch.allclose(M.slerp([3 * e1], e1, t=0.25), 1.5 * e1)
    # Two models and no base: from the first to the second.
    assert torch.equal(M.slerp([e1, e2], None, t=0.3), M.slerp([e2], e1, t=0.3))


def test_model_stock_interpolation_follows_the_angle():
    base = torch.zeros(3)
    same = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(M.model_stock([same, same], base), same)  # cos 1 -> t 1: the average
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(M.model_stock([a, b], base), base)  # cos 0 -> t 0: the base
    c = torch.tensor([1.0, 1.0, 0.0])  # cos 1/sqrt(2) between a and c
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert torch.allclose(M.model_stock([a, c], base), t * (a + c) / 2)


def test_settings_gradients_and_filters_like_mergekit():
    assert evaluate_setting(0.3, "x", 0.9) == 0.3
    assert evaluate_setting([0.0, 0.5, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 0.5, 1.0], "x", 1.0) == pytest.approx(1.0)
    spec = load_merge_spec({"models": [{"model": "a"}], "base_model": "b", "method": "slerp",
                            "parameters": {"t": [{"filter": "self_attn", "value": 0.2}, {"value": [0, 1]}]}})
    t = spec.parameters["t"]
    assert evaluate_setting(t, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.2
    assert evaluate_setting(t, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)


def _spec(**fields):
    data = {"models": [{"model": "a"}, {"model": "b"}], "base_model": "base", "method": "ties", **fields}
    return load_merge_spec(data)


@pytest.mark.parametrize("fields, message", [
    ({"method": "tie"}, "unknown merge method 'tie'"),
    ({"parameters": {"density": 0.0}}, "density must be > 0.0"),
    ({"parameters": {"density": 1.5}}, "density must be <= 1.0"),
    ({"parameters": {"lambda": -1}}, "lambda must be > 0.0"),
    ({"parameters": {"t": 0.5}}, "t is not a parameter of ties"),
    ({"method": "slerp", "parameters": {"t": 0.5}, "models": [{"model": m} for m in "abc"]},
     "slerp merges 1 to 2 model(s) besides the base; got 3"),
    ({"method": "slerp", "parameters": {"t": 0.5}, "models": [{"model": "a"}], "base_model": None},
     "slerp needs base_model (one model is interpolated from the base)"),
    ({"method": "slerp", "models": [{"model": "a"}]}, "slerp needs parameters.t"),
    ({"base_model": None}, "ties needs base_model"),
    ({"models": [{"model": "a", "parameters": {"normalize": False}}]}, "global parameter of ties"),
    ({"models": [{"model": "x/a"}, {"model": "y/a"}]}, "duplicate names ['a']"),
    ({"tokenizer_source": "c"}, "tokenizer_source: 'c' is neither 'base' nor an input's name"),
    ({"search": {"grid": {"density": [0.5]}}}, "search: needs evaluate tasks"),
    ({"density": 0.5}, "density: Extra inputs are not permitted"),
])
def test_recipe_refusals_name_the_key(fields, message):
    with pytest.raises(ConfigError) as exc:
        _spec(**fields)
    assert message in str(exc.value)


def test_grid_collapses_parameters_a_method_lacks_and_spreads_per_model_lists(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    spec = _spec(evaluate=[{"data": str(data)}],
                 search={"grid": {"method": ["linear", "ties"], "density": [0.3, 0.6], "weight": [[1, 0], 0.5]}})
    names = [candidate_name(c) for c in spec.candidates()]
    # linear ignores density: 2 weight settings; ties: 2 densities x 2 weight settings.
    assert len(names) == 6 and len(set(names)) == 6
    ties = [c for c in spec.candidates() if c.method == "ties" and c.models]
    # A grid value of a per-model parameter goes to every model (over what the inputs set).
    assert ties[0].models == {"a": {"density": 0.3, "weight": 1}, "b": {"density": 0.3, "weight": 0}}
    with pytest.raises(ConfigError, match="has 3 values for 2 models"):
        _spec(evaluate=[{"data": str(data)}], search={"grid": {"weight": [[1, 0, 1]]}})


def test_a_model_equal_to_the_base_is_not_an_input():
    spec = load_merge_spec({"models": [{"model": "base"}, {"model": "a"}], "base_model": "base",
                            "method": "slerp", "parameters": {"t": 0.5}})
    assert [m.model for m in spec.inputs] == ["a"]


def test_recipe_validation_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from tunesmith.merging.spec import load_merge_spec; "
            "load_merge_spec({'models': [{'model': 'a'}], 'base_model': 'b', 'method': 'ties'}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_filter_that_matches_nothing_falls_through_to_the_next_level():
    from tunesmith.merging.spec import Candidate
    from tunesmith.merging.streaming import Plan, tensor_arguments
    from tunesmith.merging.sources import TensorSource

    spec = load_merge_spec({"models": [{"model": "a", "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}]}},
                                       {"model": "b"}], "method": "linear", "parameters": {"weight": 0.2}})
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    ref = TensorSource("a", "a", None, {}, {n: (None, [2], "F32") for n in names})
    plan = Plan([ref, TensorSource("b", "b", None, {}, dict(ref.tensors))], None, ref, ref, names, "F32", 1)
    args = tensor_arguments(plan, Candidate(method="linear", parameters={"weight": 0.2}), spec)
    assert args[names[0]]["weight"] == [0.7, 0.2]
    assert args[names[1]]["weight"] == [0.2, 0.2]  # a's filter list has no value for mlp: the recipe's 0.2


def test_candidate_names_cannot_leave_their_folder(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    with pytest.raises(ConfigError, match="name '../../merged' must be letters"):
        _spec(evaluate=[{"data": str(data)}], search={"candidates": [{"method": "linear", "name": "../../merged"}]})
