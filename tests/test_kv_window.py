"""The bounded KV window for long chats (`--kv-window W`, runtime/kv_window.py).

The central check: a windowed run's logits equal those of the PyTorch model over the whole
conversation with an explicit attention mask that lets each query see exactly the keys the window
kept for it, at their true positions; the kept keys are checked to be the sinks plus the most recent
W to W + slack tokens; and the same comparison with positions renumbered after an eviction, or with
the sinks dropped, must fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.errors import PromptError, Qwen3VLError
from runtime.kv_window import KVWindow, WindowedCache
from runtime.pipeline import Pipeline

from conftest import assert_one_line_error, qwen3vl, random_image

CONTEXT = 512
GREEDY = dict(do_sample=False)


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine("gqa2-tied", max_context=CONTEXT)


@pytest.fixture(scope="module")
def pipe(engine):
    pipeline = Pipeline.load(engine, backend="ort", threads=1)
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoints):
    from model_src.torch_backend import checkpoint_pipeline

    return checkpoint_pipeline(tiny_checkpoints["gqa2-tied"], threads=1)


def long_text(words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    vocabulary = "red green blue cat dog house tree river stone cloud light dark quick slow one two three".split()
    return " ".join(rng.choice(vocabulary, size=words))


def windowed(pipe: Pipeline, window: int, slack: int | None = None) -> Pipeline:
    pipe.use_kv_window(window, slack)
    return pipe


# -- the window changes nothing until the conversation outgrows it ------------------------------------

def test_window_that_holds_the_conversation_changes_nothing(pipe):
    prompt = long_text(40)
    pipe.kv_window = None
    plain = pipe.generate(prompt, max_new_tokens=12, logprobs=3, **GREEDY)
    try:
        window = windowed(pipe, 256).generate(prompt, max_new_tokens=12, logprobs=3, **GREEDY)
    finally:
        pipe.kv_window = None
    assert window.token_ids == plain.token_ids
    scores = lambda result: [[entry["logprob"] for entry in step] for step in result.logprobs]  # noqa: E731
    # Not bit-equal: ONNX Runtime's first run of a session differs from later ones in the last digits.
    np.testing.assert_allclose(scores(window), scores(plain), atol=1e-5)


def test_longer_than_context_is_refused_without_the_option_and_answered_with_it(pipe, engine):
    prompt = long_text(CONTEXT + 100)
    pipe.kv_window = None
    with pytest.raises(PromptError, match="built for a context of 512"):
        pipe.generate(prompt, max_new_tokens=4, **GREEDY)
    try:
        result = windowed(pipe, 64).generate(prompt, max_new_tokens=6, **GREEDY)
    finally:
        pipe.kv_window = None
    assert result.prompt_tokens > CONTEXT and len(result.token_ids) == 6

    args = ["run", "--engine", engine, "--backend", "ort", "--prompt", prompt, "--greedy", "--max-new-tokens", 6]
    assert_one_line_error(qwen3vl(*args), "context of 512")
    answered = qwen3vl(*args, "--kv-window", 64, "--json")
    assert answered.returncode == 0, answered.stderr
    assert f'"token_ids": {result.token_ids}' in answered.stdout


# -- memory ---------------------------------------------------------------------------------------

class CacheSpy:
    """A backend that records every cache it hands out."""

    def __init__(self, backend):
        self.inner, self.caches = backend, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def new_cache(self, batch, capacity):
        cache = self.inner.new_cache(batch, capacity)
        self.caches.append(cache)
        return cache


def test_cache_memory_stays_bounded_by_sinks_window_and_slack(pipe):
    spy, inner = CacheSpy(pipe.backend), pipe.backend
    pipe.backend = spy
    try:
        window = windowed(pipe, 48, slack=16).kv_window
        prompts = [long_text(300, seed=1), long_text(700, seed=2)]
        batch = pipe.prepare(prompts)
        results = pipe.generate(prompts, max_new_tokens=40, **GREEDY)
    finally:
        pipe.backend, pipe.kv_window = inner, None
    assert [len(r.token_ids) for r in results] == [40, 40]
    sinks = window.sinks(batch)
    (cache,) = spy.caches
    bound = int(sinks.max()) + 48 + 16
    m = pipe.manifest.model
    assert all(b.shape == (2, m.num_key_value_heads, bound, m.head_dim) for b in cache.buffers)
    itemsize = cache.buffers[0].itemsize
    assert cache.nbytes == 2 * m.num_hidden_layers * 2 * m.num_key_value_heads * bound * m.head_dim * itemsize
    assert bound < batch.longest  # the conversation did outgrow it


def test_batched_rows_answer_as_they_do_alone_under_a_window(pipe):
    prompts = [long_text(150, seed=3), long_text(420, seed=4)]
    try:
        windowed(pipe, 40, slack=16)
        together = pipe.generate(prompts, max_new_tokens=30, **GREEDY)
        alone = [pipe.generate(p, max_new_tokens=30, **GREEDY) for p in prompts]
    finally:
        pipe.kv_window = None
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_a_windowed_row_is_not_stored_for_prefix_reuse(pipe):
    prompt = long_text(600, seed=10)
    assert pipe.prefix_cache is not None  # reuse is on by default
    pipe.prefix_cache.clear()
    try:
        windowed(pipe, 64)
        first = pipe.generate(prompt, max_new_tokens=4, **GREEDY)
        again = pipe.generate(prompt, max_new_tokens=4, **GREEDY)
    finally:
        pipe.kv_window = None
    assert pipe.prefix_cache.stats()["entries"] == 0 and again.cached_tokens == 0
    assert again.token_ids == first.token_ids


# -- errors ---------------------------------------------------------------------------------------

def test_sinks_longer_than_the_window_are_refused(pipe, engine, tmp_path):
    image = tmp_path / "big.png"
    random_image(128, 128, seed=5).save(image)
    prompt = "describe it " + long_text(600)
    try:
        with pytest.raises(PromptError, match="attention sinks .* more than the KV window of 16"):
            windowed(pipe, 16).generate(prompt, images=[str(image)], max_new_tokens=4, **GREEDY)
    finally:
        pipe.kv_window = None
    result = qwen3vl("run", "--engine", engine, "--backend", "ort", "--prompt", prompt, "--image", image,
                     "--kv-window", 16, "--max-new-tokens", 4)
    assert_one_line_error(result, "attention sinks", "--kv-window")


def test_bad_windows_and_the_tensorrt_backend_are_refused(pipe, engine):
    from runtime.engine_manifest import load_manifest
    from runtime.trt_backend import TrtBackend

    for bad in (0, -3, 2.5, True):
        with pytest.raises(PromptError, match="--kv-window"):
            pipe.use_kv_window(bad)
    with pytest.raises(PromptError, match="more than this engine's context"):
        pipe.use_kv_window(CONTEXT + 1)
    assert pipe.kv_window is None

    class Trt:  # the refusal is the backend's class attribute: no GPU needed to check it
        kv_window_refusal = TrtBackend.kv_window_refusal

    with pytest.raises(Qwen3VLError, match="TensorRT"):
        Pipeline(engine, load_manifest(engine), Trt(), kv_window=64)


# -- KVCache.move on every host backend -------------------------------------------------------------

def caches_of_every_kind(batch: int, capacity: int):
    from graph_passes.reference_backend import ArrayKVCache
    from model_src.torch_backend import TorchKVCache
    from runtime.ort_backend import OrtKVCache

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((batch, 2, capacity, 4)).astype(np.float32) for _ in range(4)]
    return {
        "ort": (OrtKVCache([a.copy() for a in arrays]), arrays),
        "reference": (ArrayKVCache([a.copy() for a in arrays]), arrays),
        "torch": (TorchKVCache([torch.from_numpy(a.copy()) for a in arrays[:2]],
                               [torch.from_numpy(a.copy()) for a in arrays[2:]]), arrays),
    }


@pytest.mark.parametrize("kind", ["ort", "reference", "torch"])
def test_move_copies_overlapping_slots_of_one_row(kind):
    cache, arrays = caches_of_every_kind(3, 20)[kind]
    cache.row(1).move(6, 17, 2)  # overlapping ranges: 11 slots down by 4
    buffers = cache.buffers if kind != "torch" else [t.numpy() for t in cache.keys + cache.values]
    for buffer, before in zip(buffers, arrays):
        expected = before.copy()
        expected[1, :, 2:13] = before[1, :, 6:17]
        np.testing.assert_array_equal(buffer, expected)


# -- the kept keys: a brute-force reference ----------------------------------------------------------

class CallRecorder:
    """A backend that records, for each decoder call, the conversation tokens the window's cache
    held before it and how many new tokens it brought (one row)."""

    def __init__(self, backend):
        self.inner, self.calls, self.window = backend, [], None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, cache, chunk):
        self.calls.append((self.window.tokens[0, :self.window.slots[0]].copy(), int(chunk.lengths[0]),
                           int(chunk.past_lengths[0])))
        return self.inner.prefill(cache, chunk)

    def decode(self, cache, tokens, positions, past_lengths):
        self.calls.append((self.window.tokens[0, :self.window.slots[0]].copy(), 1, int(past_lengths[0])))
        return self.inner.decode(cache, tokens, positions, past_lengths).copy()


class MaskedAttention(torch.nn.Module):
    """KVCacheAttention's signature over a whole sequence with an explicit (S, S) mask of allowed keys."""

    def __init__(self, core, allowed: np.ndarray):
        super().__init__()
        self.core, self.allowed = core, torch.from_numpy(allowed)

    def forward(self, q, k, v, past_key, past_value, seqlens_k, total_sequence_length):
        b, s, _ = q.shape
        d, kv = self.core.head_dim, self.core.num_kv_heads
        group = self.core.num_heads // kv
        q = q.view(b, s, kv, group, d).permute(0, 2, 3, 1, 4)
        k = k.view(b, s, kv, d).transpose(1, 2)[:, :, None]
        v = v.view(b, s, kv, d).transpose(1, 2)[:, :, None]
        scores = (q @ k.transpose(3, 4)) * d ** -0.5
        scores = scores.masked_fill(~self.allowed, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return out.permute(0, 3, 1, 2, 4).reshape(b, s, -1), past_key, past_value


@torch.no_grad()
def masked_logits(model, input_ids, position_ids, visual, deepstack, allowed) -> np.ndarray:
    """Logits (S, vocab) of the PyTorch model over one row with attention limited to `allowed`."""
    text, s = model.language_model, input_ids.shape[1]
    ids = torch.from_numpy(input_ids)
    embeds = text.embed_tokens(ids)
    is_image = (ids == model.config.image_token_id)[..., None]
    embeds = torch.where(is_image, torch.from_numpy(visual), embeds)
    cores = [layer.self_attn.core for layer in text.layers]
    try:
        for layer, core in zip(text.layers, cores):
            layer.self_attn.core = MaskedAttention(core, allowed)
        buffers = [torch.zeros((1, 1, 1, 1)) for _ in cores]  # the masked attention keeps no cache
        hidden, _, _ = text(embeds, torch.from_numpy(position_ids), torch.tensor([s - 1], dtype=torch.int32),
                            torch.tensor([s], dtype=torch.int32), buffers, buffers, torch.from_numpy(deepstack))
    finally:
        for layer, core in zip(text.layers, cores):
            layer.self_attn.core = core
    return (hidden[0] @ model.lm_head_weight().T).numpy()


def windowed_run(backend, batch, features, window: KVWindow, steps: int):
    """Greedy prefill + `steps` decode steps of one row under the window: logits per step, the tokens,
    and what each decoder call's queries saw."""
    recorder = CallRecorder(backend)
    cache = recorder.window = WindowedCache(recorder, batch, window)
    logits = [cache.prefill(recorder, batch, features)[0].copy()]
    count, tokens = int(batch.lengths[0]), []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        counts = np.array([count])
        logits.append(cache.decode(recorder, np.array(tokens[-1:]), batch.decode_positions(counts), counts)[0].copy())
        count += 1
    return np.stack(logits), tokens, recorder.calls, cache


def visibility(calls, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(total, total) allowed[query, key] and each query's slot, from the recorded calls."""
    allowed, slots, query = np.zeros((total, total), dtype=bool), np.zeros(total, dtype=np.int64), 0
    for held, count, past in calls:
        for i in range(count):
            allowed[query + i, held] = True
            allowed[query + i, query:query + i + 1] = True
            slots[query + i] = past + i
        query += count
    assert query == total
    return allowed, slots


@pytest.mark.parametrize("backend_kind", ["ort", "torch"])
def test_windowed_logits_equal_a_masked_full_attention_reference(pipe, torch_pipe, tmp_path, backend_kind):
    image = tmp_path / "small.png"
    random_image(48, 64, seed=6).save(image)
    chat = [{"role": "system", "content": "You answer briefly. " + long_text(6, seed=8)},
            {"role": "user", "content": [{"type": "image", "image": str(image)},
                                         {"type": "text", "text": long_text(120, seed=7)}]}]
    window_size, slack, steps = 24, 8, 20
    runner = pipe if backend_kind == "ort" else torch_pipe
    window = KVWindow.for_engine(window_size, runner.prompts, runner.manifest.model, slack)
    batch = runner.prepare([chat], min_pixels=32 * 32, max_pixels=64 * 64)
    features = runner.backend.encode_images(batch.vision)
    logits, tokens, calls, cache = windowed_run(runner.backend, batch, features, window, steps)

    # The sinks: the system message and everything through the image's <|vision_end|>.
    ids = batch.row(0)
    sinks = int(cache.sinks[0])
    vision_end = int(np.flatnonzero(ids == runner.manifest.model.vision_end_token_id)[-1])
    assert sinks == vision_end + 1 and (ids[:sinks] == runner.manifest.model.image_token_id).any()
    assert cache.evictions >= 5 and cache.capacity == sinks + window_size + slack

    # What each query saw: all sinks, at least its W latest tokens, at most W + slack, nothing else.
    length = int(batch.lengths[0])
    total = length + steps
    allowed, slots = visibility(calls, total)
    for t in range(sinks + window_size + slack, total):
        seen = np.flatnonzero(allowed[t])
        recent = seen[seen >= sinks]
        assert (seen[:sinks] == np.arange(sinks)).all()
        assert recent[-1] == t and (np.diff(recent) == 1).all(), t
        assert window_size <= len(recent) <= window_size + slack, (t, len(recent))

    # The reference: the PyTorch model over the whole conversation, each query masked to those keys.
    sequence = np.concatenate([ids, tokens[:-1]])[None]
    positions = np.concatenate([batch.position_ids[:, :1, :length],
                                np.broadcast_to(length + np.arange(steps - 1) + batch.rope_deltas[0], (3, 1, steps - 1))],
                               axis=2)
    chunk = batch.chunk(features, np.float32, 0, length)
    hidden = features.image_embeds.shape[-1]
    visual = np.concatenate([chunk.visual_embeds, np.zeros((1, steps - 1, hidden), np.float32)], axis=1)
    deepstack = np.concatenate([chunk.deepstack_embeds,
                                np.zeros((chunk.deepstack_embeds.shape[0], 1, steps - 1, hidden), np.float32)], axis=2)
    model = torch_pipe.backend.model
    queries = np.arange(length - 1, total - 1)  # the prompt's last token, then each decoded token
    expected = masked_logits(model, sequence, positions, visual, deepstack, allowed[:-1, :-1])[queries]
    error = np.abs(logits[:-1] - expected).max()
    assert error < 1e-3, error
    assert (np.argmax(expected, axis=-1) == tokens).all()

    # The comparison can fail: positions renumbered after evictions (a query at its slot), or no sinks.
    renumbered = positions - (np.arange(total - 1) - slots[:-1])
    wrong_positions = masked_logits(model, sequence, renumbered, visual, deepstack, allowed[:-1, :-1])[queries]
    no_sinks = allowed[:-1, :-1].copy()
    no_sinks[sinks + window_size + slack:, :sinks] = False
    wrong_sinks = masked_logits(model, sequence, positions, visual, deepstack, no_sinks)[queries]
    for wrong in (wrong_positions, wrong_sinks):
        assert np.abs(logits[:-1] - wrong).max() > 20 * max(error, 1e-5)


# -- the fidelity bench -----------------------------------------------------------------------------

def test_fidelity_bench_scores_no_loss_for_a_window_that_holds_the_chunk(engine, tmp_path):
    from bench.kv_window_fidelity import markdown, measure

    text = tmp_path / "text.txt"
    text.write_text(long_text(400, seed=9))
    report = measure(engine, text, ctx=160, score_tokens=24, windows=[16, 512], threads=1)
    full, small, large = report["rows"]
    assert large["mean_kl"] < 1e-6 and large["top1_agreement"] == 1.0  # never evicts
    assert small["mean_kl"] > 1e-3 and small["kv_bytes"] < full["kv_bytes"]
    assert "| 16 (16) |" in markdown(report)
