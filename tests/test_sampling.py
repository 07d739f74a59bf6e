"""runtime.sampling draws tokens from the distribution transformers' logits warpers define.

transformers samples from softmax(TopP(TopK(Temperature(logits)))): TemperatureLogitsWarper divides the
logits, TopKLogitsWarper removes the tokens *below* the k-th largest (so ties with it stay), and
TopPLogitsWarper, on the renormalised rest, removes a token once the mass ranked above it reaches top_p.
`reference_distribution` writes those rules out in numpy; the statistical tests hold many seeded draws
of `next_tokens` to it, and the other tests hold the reference and the drawn tokens to the warpers.
"""

import math
from functools import cache

import numpy as np
import pytest

from runtime.sampling import SamplingConfig, next_tokens


def reference_distribution(logits, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """(vocab,) logits -> (vocab,) probabilities, zero where a warper removed the token."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    kept = np.ones(scaled.size, dtype=bool)
    if 0 < top_k < scaled.size:
        kept = scaled >= np.sort(scaled)[-top_k]
    probs = np.where(kept, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1:
        # Among tokens tied at the cut, the lower ids stay here; transformers keeps whichever torch.sort
        # puts last (the higher ids on the CPU). Which of equal tokens stay is arbitrary: only the count is
        # compared with transformers.
        ranked = np.argsort(-probs, kind="stable")
        mass_above = np.concatenate([[0.0], np.cumsum(probs[ranked])[:-1]])
        probs[ranked[mass_above >= top_p]] = 0.0
        probs /= probs.sum()
    return probs


def transformers_distribution(logits, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """The same through transformers' own warpers, in the order generate() applies them."""
    torch = pytest.importorskip("torch", reason="torch (a test dependency) is not installed")
    logits_process = pytest.importorskip(
        "transformers.generation.logits_process", reason="transformers (a test dependency) is not installed"
    )
    scores = torch.tensor(np.asarray(logits, dtype=np.float32)[None])
    warpers = [logits_process.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(logits_process.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(logits_process.TopPLogitsWarper(top_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores.double().softmax(-1)[0].numpy()


def draw(logits, config: SamplingConfig, draws: int, seed: int) -> np.ndarray:
    """Token counts of `draws` seeded samples, all taken in one batch of identical rows."""
    rows = np.tile(np.asarray(logits, dtype=np.float32), (draws, 1))
    tokens = next_tokens(rows, config, np.random.default_rng(seed))
    assert tokens.shape == (draws,)
    return np.bincount(tokens, minlength=rows.shape[1])


def chi_square_limit(df: int, z: float = 4.75) -> float:
    """Upper chi-square quantile at one-sided normal z (4.75: p ~ 1e-6), by Wilson-Hilferty."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def assert_follows(counts: np.ndarray, expected: np.ndarray):
    """Same support exactly, then a chi-square goodness-of-fit test over the support."""
    draws = counts.sum()
    support = np.flatnonzero(expected > 0)
    outside = np.flatnonzero((counts > 0) & (expected == 0))
    assert outside.size == 0, f"drew tokens {outside.tolist()}, which the warpers remove"
    assert (expected[support] * draws >= 20).all(), "test design: every kept token must be likely to show"
    never = support[counts[support] == 0]
    assert never.size == 0, f"never drew tokens {never.tolist()}, which the warpers keep"
    if support.size == 1:
        return
    want = expected[support] * draws
    chi2 = float((((counts[support] - want) ** 2) / want).sum())
    total_variation = 0.5 * float(np.abs(counts / draws - expected).sum())
    limit = chi_square_limit(support.size - 1)
    assert chi2 < limit, (
        f"draws do not follow the warpers' distribution: chi2 {chi2:.1f} > {limit:.1f} "
        f"(df {support.size - 1}, total variation {total_variation:.3f})\n"
        f"expected {np.round(expected, 4).tolist()}\nobserved {np.round(counts / draws, 4).tolist()}"
    )


def kept_values(probs: np.ndarray, logits) -> list[float]:
    """The logits of the kept tokens, sorted: equal kept sets up to which of exactly tied tokens stay."""
    return sorted(np.asarray(logits, dtype=np.float32)[probs > 0].tolist())


# Ten distinct logits in no particular id order (softmax 1.5% .. 31%).
LOGITS = np.array([0.3, 2.0, -1.0, 1.2, 0.7, -0.4, 1.5, 0.0, 1.0, -0.7], dtype=np.float32)
# 2.0, then three tokens tied at 1.0: a top-k boundary inside a tie.
TIED = np.array([1.0, -0.5, 1.0, 0.0, 2.0, 0.5, 1.0, -1.0], dtype=np.float32)
# Probabilities 1/8, 1/2, 1/8, 1/4: exactly so in float32, where transformers computes them, so there
# the top two hold exactly 0.75; float64 rounding puts them 2e-9 above it.
DYADIC = np.log(np.array([1.0, 4.0, 1.0, 2.0], dtype=np.float32))
# Eight equal logits: each exactly 1/8, so every multiple of 1/8 is a cumulative mass reached exactly.
EQUAL = np.zeros(8, dtype=np.float32)

CASES = {
    # name: (logits, temperature, top_k, top_p)
    "softmax": (LOGITS, 1.0, 0, 1.0),
    "temperature 0.7": (LOGITS, 0.7, 0, 1.0),
    "temperature 2": (LOGITS, 2.0, 0, 1.0),
    "top-k 4": (LOGITS, 1.0, 4, 1.0),
    "top-p 0.8": (LOGITS, 1.0, 0, 0.8),
    "temperature, top-k, top-p": (LOGITS, 1.4, 6, 0.75),
    "top-k boundary inside a tie": (TIED, 0.8, 2, 1.0),
    "top-k tie, then top-p": (TIED, 1.0, 3, 0.6),
    "top-p reached by the top two": (DYADIC, 1.0, 0, 0.75),
    "top-p reached by the top token": (DYADIC, 1.0, 0, 0.5),
    "top-p reached exactly inside a tie": (EQUAL, 1.0, 0, 0.5),
    "top-k keeps the whole tie, top-p reached exactly": (EQUAL, 1.0, 3, 0.375),
    "top-k and top-p keep one token": (LOGITS, 1.3, 1, 0.9),
}


@cache
def case_counts(name: str) -> np.ndarray:
    """4000 draws a case. The right distribution scores chi2 under 8 on every case against limits of
    27-46; each bug tried (top-k or top-p keeping one token too few, top-p keeping one too many when the
    mass is reached exactly, top-k dropping tokens tied with the k-th, logits multiplied by the
    temperature, a uniform choice among the kept tokens) fails cases by a kept token never drawn, or
    by chi2 of 180 and more."""
    logits, temperature, top_k, top_p = CASES[name]
    return draw(logits, SamplingConfig(True, temperature, top_p, top_k), 4000, seed=sum(map(ord, name)))


@pytest.mark.parametrize("name", CASES)
def test_draws_follow_the_warpers_distribution(name):
    assert_follows(case_counts(name), reference_distribution(*CASES[name]))


@pytest.mark.parametrize("name", CASES)
def test_drawn_tokens_are_those_transformers_keeps(name):
    logits = CASES[name][0]
    assert kept_values(case_counts(name), logits) == kept_values(transformers_distribution(*CASES[name]), logits)


def test_boundaries_keep_what_transformers_keeps():
    """The cases where an off-by-one would show, spelt out."""
    assert kept_values(transformers_distribution(TIED, 1.0, 2), TIED) == [1.0, 1.0, 1.0, 2.0]
    assert np.count_nonzero(transformers_distribution(DYADIC, 1.0, 0, 0.75)) == 2
    assert np.count_nonzero(transformers_distribution(DYADIC, 1.0, 0, 0.5)) == 1
    assert np.count_nonzero(transformers_distribution(EQUAL, 1.0, 0, 0.5)) == 4
    assert np.count_nonzero(transformers_distribution(EQUAL, 1.0, 3, 0.375)) == 3
    for case in ("top-k boundary inside a tie", "top-p reached by the top two", "top-p reached by the top token",
                 "top-p reached exactly inside a tie", "top-k keeps the whole tie, top-p reached exactly"):
        assert np.count_nonzero(case_counts(case)) == np.count_nonzero(transformers_distribution(*CASES[case])), case


def test_reference_is_transformers_on_random_logits():
    """The reference against the warpers themselves, on rows with many ties (logits in steps of 0.25)."""
    rng = np.random.default_rng(3)
    for _ in range(60):
        logits = np.round(rng.normal(scale=1.5, size=40) * 4) / 4
        temperature = float(rng.choice([0.6, 1.0, 1.7]))
        top_k = int(rng.choice([0, 1, 3, 8, 20]))
        top_p = float(rng.choice([0.3, 0.5, 0.75, 0.9, 1.0]))
        ours = reference_distribution(logits, temperature, top_k, top_p)
        theirs = transformers_distribution(logits, temperature, top_k, top_p)
        # Sorted: tokens tied at the top-p cut may differ in id, never in number or probability.
        np.testing.assert_allclose(np.sort(ours), np.sort(theirs), rtol=1e-5, atol=1e-7,
                                   err_msg=f"T={temperature} top_k={top_k} top_p={top_p}")


def test_same_seed_same_tokens():
    rows = np.tile(LOGITS, (200, 1))
    config = SamplingConfig(True, 0.9, 0.9, 5)
    first = next_tokens(rows, config, np.random.default_rng(11))
    assert np.array_equal(first, next_tokens(rows, config, np.random.default_rng(11)))
    assert not np.array_equal(first, next_tokens(rows, config, np.random.default_rng(12)))


def test_greedy_takes_the_largest_logit_per_row():
    rows = np.stack([LOGITS, -LOGITS])
    assert next_tokens(rows, SamplingConfig(), np.random.default_rng(0)).tolist() == [1, 2]


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_logprobs_are_the_k_largest_in_order_with_ties_by_id(k):
    from runtime.sampling import log_softmax, top_logprobs

    logits = np.random.default_rng(3).standard_normal((3, 5000)).astype(np.float32)
    logits[1, 100:140] = 6.0  # a tie wider than k at the top
    logits[2, [7, 3, 9]] = 8.0
    expected = np.argsort(-log_softmax(logits), axis=-1, kind="stable")[:, :k]
    got = top_logprobs(logits, k)
    assert [[entry["token_id"] for entry in row] for row in got] == expected.tolist()
    for row, lp in zip(got, log_softmax(logits)):
        assert all(abs(entry["logprob"] - lp[entry["token_id"]]) < 1e-6 for entry in row)
