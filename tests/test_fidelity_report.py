"""The fidelity figures of `qwen3vl bench --reference` (bench/fidelity.py) mean what they say:
KL(P_ref || P_engine) in nats, in that direction, averaged over positions, and top-1 agreement,
on hand-made distributions where the answers are known, and through the whole teacher-forced path
on an engine perturbed in a known way."""

from __future__ import annotations

import numpy as np
import pytest

from bench.fidelity import TeacherForced, compare, fidelity, teacher_forced_logits
from conftest import random_image
from runtime import Pipeline

PROMPT = "Describe this image."


def teacher_forced(probabilities) -> TeacherForced:
    """Hand-made next-token distributions (positions, vocab) as teacher-forced logits."""
    logits = np.log(np.asarray(probabilities, dtype=np.float64)).astype(np.float32)
    return TeacherForced(logits=logits, input_ids=np.arange(10), start=2, image_positions=1)


def kl(p, q) -> np.ndarray:
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return (p * np.log(p / q)).sum(-1)


def test_kl_is_reference_to_engine_in_nats_averaged_over_positions():
    reference = [[0.6, 0.3, 0.1], [0.5, 0.25, 0.25], [0.2, 0.7, 0.1]]
    engine = [[0.2, 0.2, 0.6], [0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]
    forward, backward = kl(reference, engine), kl(engine, reference)
    # The directions differ by far more than float rounding: a reversed KL cannot pass.
    assert abs(forward.mean() - backward.mean()) > 0.05
    result = compare(teacher_forced(reference), teacher_forced(engine))
    assert result["mean_kl"] == pytest.approx(forward.mean(), rel=1e-5)
    assert result["max_kl"] == pytest.approx(forward.max(), rel=1e-5)
    assert result["top1_agreement"] == pytest.approx(2 / 3)  # the first position's argmax moved
    assert result["positions"] == 3 and result["image_positions"] == 1


def test_kl_of_identical_distributions_is_zero_and_row_blocks_do_not_matter():
    rng = np.random.default_rng(0)
    reference = rng.dirichlet(np.ones(50), size=70)
    engine = rng.dirichlet(np.ones(50), size=70)
    same = compare(teacher_forced(reference), teacher_forced(reference))
    assert same["mean_kl"] == pytest.approx(0, abs=1e-7) and same["top1_agreement"] == 1
    # compare() works through row blocks (32 by default): 70 positions cross two block edges.
    whole = compare(teacher_forced(reference), teacher_forced(engine), rows=1000)
    blocked = compare(teacher_forced(reference), teacher_forced(engine), rows=32)
    assert whole == pytest.approx(blocked)
    assert whole["mean_kl"] == pytest.approx(kl(reference, engine).mean(), rel=1e-5)


class SharperBackend:
    """Another backend with its logits multiplied by `factor` (> 1: the same argmax, more peaked)."""

    def __init__(self, inner, factor: float):
        self.inner, self.factor = inner, factor
        self.name, self.decoder_dtype = inner.name, inner.decoder_dtype

    def encode_images(self, images):
        return self.inner.encode_images(images)

    def new_cache(self, batch, capacity):
        return self.inner.new_cache(batch, capacity)

    def prefill(self, cache, chunk):
        return self.factor * self.inner.prefill(cache, chunk)

    def decode(self, cache, tokens, positions, past_lengths):
        return self.factor * self.inner.decode(cache, tokens, positions, past_lengths)

    def close(self):
        self.inner.close()


def test_fidelity_of_an_engine_against_a_perturbed_copy_is_the_kl_from_the_reference(tiny_engine):
    """The whole path (both engines teacher-forced over the same prompt and image, then compared)
    on a perturbation whose KL is known exactly from the reference's own logits, in a case where the
    two directions differ by a third (0.81 and 0.54 nats). (The engine against itself: tests/test_bench_command.py.)"""
    reference = Pipeline.load(tiny_engine("gqa2-tied"))
    sharper = Pipeline(reference.engine_dir, reference.manifest, SharperBackend(reference.backend, 1.5))
    image, positions = random_image(96, 96, 4), 32
    logits = teacher_forced_logits(reference, PROMPT, image, positions).logits.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(1.5 * (logits - logits.max(-1, keepdims=True)))
    q /= q.sum(-1, keepdims=True)
    forward, backward = kl(p, q).mean(), kl(q, p).mean()
    assert forward > 0.01 and abs(forward - backward) > 0.2 * forward, (forward, backward)

    result = fidelity(sharper, reference, PROMPT, image, positions)
    assert result["mean_kl"] == pytest.approx(forward, rel=1e-3), (forward, backward)
    assert result["top1_agreement"] == 1 and result["positions"] == positions and result["image_positions"] > 0
