"""export/precision_allocation.py: the bytes it counts are the quantizer's, the formats' measured
errors fall as they should, and the allocation fits its budget, spends it where the estimated KL
falls most, and never gets worse with more bytes. Building with --weight-budget is
tests/test_mixed_precision.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from export.precision_allocation import (allocate, budget_bytes, candidate_formats, format_errors, linear_shapes,
                                        placed_parameters, stored_bytes)
from graph_passes.quantize_weights import WeightFormat, quantize_blockwise, stored_block_size
from runtime.errors import Qwen3VLError

BODY = WeightFormat(4, 64, True, "clip")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(48, 512), (40, 200), (8, 24)])
def test_stored_bytes_are_what_the_quantizer_stores(symmetric, shape):
    weight = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for form in [*candidate_formats(WeightFormat(4, 64, symmetric, "none")), WeightFormat(8, 32, symmetric)]:
        block = stored_block_size(form.block_size, shape[1])
        packed, scales, zero_points = quantize_blockwise(weight, form.bits, block, form.symmetric, rows=True)
        stored = packed.nbytes + scales.nbytes + (0 if zero_points is None else zero_points.nbytes)
        assert stored_bytes(shape, form) == stored, form


def test_candidates_hold_the_body_and_run_from_cheapest_to_dearest():
    shape = (256, 2048)
    for body in (BODY, WeightFormat(8, 64, False, "none"), WeightFormat(4, 32, True, "none")):
        formats = candidate_formats(body)
        assert body in formats and {(f.symmetric, f.scale_search) for f in formats} == {(body.symmetric,
                                                                                         body.scale_search)}
    ladder = candidate_formats(BODY)
    assert [stored_bytes(shape, f) for f in ladder] == sorted(stored_bytes(shape, f) for f in ladder)


def test_format_errors_fall_with_smaller_blocks_and_more_bits(tiny_checkpoints):
    names = ["language_model.layers.1.mlp.down_proj.weight", "language_model.layers.0.self_attn.q_proj.weight"]
    formats = candidate_formats(BODY)
    errors, shapes = format_errors(tiny_checkpoints["gqa2-tied"], names, formats, rows=64)
    assert set(errors) == set(shapes) == set(names)
    for name in names:
        by_bytes = sorted(formats, key=lambda f: stored_bytes(shapes[name], f))
        found = [errors[name][f] for f in by_bytes]
        assert all(0 < e < 0.05 for e in found), found
        # Longer blocks cannot do better where K holds them (tiny K clamps 128 to the same block as 64).
        assert found == sorted(found, reverse=True), found
        assert errors[name][WeightFormat(8, 128, True, "clip")] < errors[name][BODY] / 50


def _problem(seed: int, linears: int = 4):
    """Random sensitivities and shapes, with errors shaped like a Gaussian weight's (measured ratios)."""
    rng = np.random.default_rng(seed)
    ratios = {128: 1.16, 64: 1.0, 32: 0.81}
    names = [f"w{i}" for i in range(linears)]
    sensitivities = {name: float(rng.lognormal(-3, 1.5)) for name in names}
    shapes = {name: (int(rng.choice([64, 128, 384])), int(rng.choice([128, 256]))) for name in names}
    errors = {name: {f: (0.008 * ratios[f.block_size] if f.bits == 4 else 4e-5) * float(rng.uniform(0.9, 1.1))
                     for f in candidate_formats(BODY)} for name in names}
    return sensitivities, errors, shapes


def _estimate(sensitivities, errors, chosen):
    return sum(sensitivities[n] * errors[n][f] / errors[n][BODY] for n, f in chosen.items())


def test_allocation_fits_the_budget_and_more_bytes_never_cost_kl():
    for seed in range(5):
        sensitivities, errors, shapes = _problem(seed)
        ladder = candidate_formats(BODY)
        cheapest = sum(stored_bytes(shapes[n], ladder[0]) for n in shapes)
        dearest = sum(stored_bytes(shapes[n], ladder[-1]) for n in shapes)
        last = None
        for budget in np.linspace(cheapest, dearest, 12).astype(int):
            result = allocate(sensitivities, BODY, errors, shapes, int(budget))
            assert result.bytes == sum(stored_bytes(shapes[n], f) for n, f in result.formats.items()) <= budget
            total = _estimate(sensitivities, errors, result.formats)
            assert total == pytest.approx(sum(result.estimated_kl.values()))
            if last is not None:
                assert total <= last * (1 + 1e-9)
            last = total
        assert set(allocate(sensitivities, BODY, errors, shapes, cheapest).formats.values()) == {ladder[0]}
        assert set(allocate(sensitivities, BODY, errors, shapes, dearest).formats.values()) == {ladder[-1]}


def test_allocation_is_near_the_best_choice_found_by_trying_all():
    """Greedy on convex hulls is optimal up to the one upgrade that did not fit: against every
    combination of formats, it is never worse than the best that fits in the budget less the
    largest single step."""
    ladder = candidate_formats(BODY)
    for seed in range(4):
        sensitivities, errors, shapes = _problem(seed, linears=3)
        names = list(shapes)
        combos = [dict(zip(names, c)) for c in itertools.product(ladder, repeat=len(names))]
        cost = {id(c): sum(stored_bytes(shapes[n], f) for n, f in c.items()) for c in combos}
        step = max(stored_bytes(shapes[n], ladder[-1]) - stored_bytes(shapes[n], ladder[0]) for n in names)
        cheapest = sum(stored_bytes(shapes[n], ladder[0]) for n in names)
        for budget in np.linspace(cheapest, cheapest + 3 * step, 9).astype(int):
            greedy = _estimate(sensitivities, errors, allocate(sensitivities, BODY, errors, shapes, int(budget)).formats)
            best_below = min(_estimate(sensitivities, errors, c) for c in combos if cost[id(c)] <= budget - step
                             ) if budget - step >= cheapest else None
            best = min(_estimate(sensitivities, errors, c) for c in combos if cost[id(c)] <= budget)
            assert greedy >= best * (1 - 1e-9)  # nothing beats the true optimum
            if best_below is not None:
                assert greedy <= best_below * (1 + 1e-9)


def test_the_most_sensitive_linear_gets_the_bytes_first():
    sensitivities, errors, shapes = _problem(0)
    shapes = {name: (128, 256) for name in shapes}
    top = max(sensitivities, key=sensitivities.get)
    sensitivities[top] = 100 * max(sensitivities.values())
    ladder = candidate_formats(BODY)
    cheapest = sum(stored_bytes(shapes[n], ladder[0]) for n in shapes)
    upgrade = stored_bytes(shapes[top], ladder[-1]) - stored_bytes(shapes[top], ladder[0])
    formats = allocate(sensitivities, BODY, errors, shapes, cheapest + upgrade).formats
    assert formats[top] == ladder[-1]
    assert all(form == ladder[0] for name, form in formats.items() if name != top)


def test_a_budget_under_the_smallest_formats_is_refused():
    sensitivities, errors, shapes = _problem(1)
    cheapest = sum(stored_bytes(shapes[n], candidate_formats(BODY)[0]) for n in shapes)
    with pytest.raises(Qwen3VLError, match="smallest format everywhere needs"):
        allocate(sensitivities, BODY, errors, shapes, cheapest - 1)


def test_budgets_in_bits_per_weight_count_the_placed_weights():
    from model_src.config import TextConfig

    text = TextConfig()  # the 2B decoder's shape
    linears = text.num_hidden_layers * sum(n * k for n, k in linear_shapes(text).values())
    assert linears == pytest.approx(1.41e9, rel=0.01)  # 28 layers of 50.3M
    assert placed_parameters(text, head_placed=True) == linears + text.vocab_size * text.hidden_size
    assert budget_bytes("4.5bpw", text, 1000, head_placed=False) == 1000 + int(4.5 * linears / 8)
    assert budget_bytes(" 8BPW ", text, 0, head_placed=True) == placed_parameters(text, True)
    assert budget_bytes(123456, text, 1000, head_placed=True) == 123456
    for bad in ("0bpw", "bpw", "4.5", "-1bpw", "40bpw"):
        with pytest.raises(Qwen3VLError, match="4.5bpw"):
            budget_bytes(bad, text, 0, head_placed=True)
