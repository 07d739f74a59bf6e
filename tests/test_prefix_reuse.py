"""Prefix and image reuse (runtime/prefix_cache.py): a request that starts like an earlier one takes
the earlier KV and image features and gives exactly what a cold run gives.

Each warm answer is compared with the same request on a pipeline without the cache (cache_memory=0):
the same greedy tokens, logprobs within 1e-5. Misses are asked for where the key must see more than
token ids: another image with the same text (identical placeholder ids) and another pixel budget.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image
from runtime import Pipeline
from runtime.prefix_cache import MIN_REUSED_TOKENS

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine("gqa2-tied")


@pytest.fixture(scope="module")
def cold(engine):
    pipe = Pipeline.load(engine, cache_memory=0)
    assert pipe.prefix_cache is None
    return pipe


def answer(pipe: Pipeline, chat, **options):
    return pipe.generate(chat, max_new_tokens=NEW_TOKENS, do_sample=False, logprobs=2, **options)


def assert_same_answer(warm, cold) -> None:
    assert warm.token_ids == cold.token_ids
    for warm_step, cold_step in zip(warm.logprobs, cold.logprobs, strict=True):
        assert [a["token_id"] for a in warm_step] == [a["token_id"] for a in cold_step]
        np.testing.assert_allclose([a["logprob"] for a in warm_step], [a["logprob"] for a in cold_step], atol=1e-5)


def user(text: str, images=()) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image} for image in images]
            + [{"type": "text", "text": text}]}


def follow_up(first_chat: list, first_answer, question: str) -> list:
    return first_chat + [{"role": "assistant", "content": first_answer.text}, user(question)]


@pytest.mark.parametrize("images", [0, 1, 2], ids=["text", "one-image", "two-images"])
def test_a_follow_up_turn_reuses_the_first_turn_and_answers_as_a_cold_run(engine, cold, images):
    pipe = Pipeline.load(engine)
    pictures = [random_image(96, 128, seed) for seed in range(images)]
    first_chat = [user("Describe what you see in a few words.", pictures)]
    first = answer(pipe, first_chat)
    assert first.cached_tokens == 0
    assert_same_answer(first, answer(cold, first_chat))

    chat = follow_up(first_chat, first, "And what colour is the thing on the left of it?")
    warm = answer(pipe, chat)
    # The first turn's prompt at least (its last "\n" may merge with the answer's first characters
    # when the conversation is tokenized again; a random model's answers start with anything).
    assert warm.cached_tokens >= first.prompt_tokens - 1
    assert warm.cached_tokens < warm.prompt_tokens
    assert_same_answer(warm, answer(cold, chat))
    stats = pipe.reuse_stats()
    kind = "image" if images else "text"
    assert (stats[kind]["hits"], stats[kind]["misses"]) == (1, 1)
    assert stats[kind]["cached_tokens"] == warm.cached_tokens


def test_the_same_prompt_again_reuses_all_but_its_last_token(engine, cold):
    pipe = Pipeline.load(engine)
    prompt = [user("Tell me a short story about a lighthouse keeper.")]
    answer(pipe, prompt)
    again = answer(pipe, prompt)
    assert again.cached_tokens == again.prompt_tokens - 1
    assert_same_answer(again, answer(cold, prompt))


def test_a_prefix_continued_in_chunks_gives_the_cold_answer(engine):
    """Reused rows continue row by row, chunk after chunk, from their own start."""
    pipe, cold_chunked = Pipeline.load(engine), Pipeline.load(engine, cache_memory=0)
    pipe.prefill_chunk = cold_chunked.prefill_chunk = 5
    first_chat = [user("Describe it.", [random_image(96, 96, 3)])]
    first = answer(pipe, first_chat)
    chat = follow_up(first_chat, first, "Now describe the same picture again, but in many more words than before.")
    warm = answer(pipe, chat)
    assert warm.cached_tokens > 0
    assert_same_answer(warm, answer(cold_chunked, chat))


def test_another_image_with_the_same_text_misses_and_answers_for_the_new_image(engine, cold):
    pipe = Pipeline.load(engine)
    text = "What is in this picture?"
    answer(pipe, [user(text, [random_image(96, 128, 1)])])
    other = [user(text, [random_image(96, 128, 2)])]
    warm = answer(pipe, other)
    # The same token ids up to the last, but another image: nothing from the image on may be reused.
    assert warm.cached_tokens == 0
    assert_same_answer(warm, answer(cold, other))
    assert pipe.reuse_stats()["image_features"] == {"hits": 0, "misses": 2}

    same_again = answer(pipe, [user(text, [random_image(96, 128, 2)])])  # equal pixels, a new object
    assert same_again.cached_tokens == same_again.prompt_tokens - 1


def test_a_prefix_ends_where_the_second_image_differs(engine, cold):
    pipe = Pipeline.load(engine)
    same, text = random_image(96, 128, 9), "Compare the two pictures."
    answer(pipe, [user(text, [same, random_image(96, 128, 10)])])
    chat = [user(text, [same, random_image(96, 128, 11)])]
    warm = answer(pipe, chat)
    batch = pipe.prepare([chat])
    second_image_start = int(np.flatnonzero(batch.feature_index[0] >= 0)[batch.image_tokens // 2])
    assert MIN_REUSED_TOKENS <= warm.cached_tokens == second_image_start
    assert_same_answer(warm, answer(cold, chat))


def test_an_image_seen_before_skips_the_vision_encoder_where_the_prefix_differs(engine, cold):
    pipe = Pipeline.load(engine)
    picture = random_image(96, 128, 7)
    answer(pipe, [{"role": "system", "content": "You are terse."}, user("What is in this picture?", [picture])])
    chat = [{"role": "system", "content": "You are a careful, detailed observer."},
            user("What is in this picture?", [picture])]
    encoded, encode = [], pipe.backend.encode_images
    pipe.backend.encode_images = lambda images: encoded.append(images) or encode(images)
    warm = answer(pipe, chat)
    assert warm.cached_tokens < MIN_REUSED_TOKENS  # the KV differs from the system prompt on
    assert encoded == [] and pipe.reuse_stats()["image_features"] == {"hits": 1, "misses": 1}
    assert_same_answer(warm, answer(cold, chat))


def test_another_pixel_budget_misses_even_where_the_pixels_come_out_the_same(engine, cold):
    pipe = Pipeline.load(engine)
    chat = [user("What is in this picture?", [random_image(96, 128, 4)])]
    budget = pipe.manifest.image_processor
    first = answer(pipe, chat)
    # A lower floor that the image is above anyway: the same grid and pixels, another budget.
    changed = answer(pipe, chat, min_pixels=budget.min_pixels // 2)
    assert changed.prompt_tokens == first.prompt_tokens
    assert changed.cached_tokens == 0
    assert pipe.reuse_stats()["image_features"]["hits"] == 0
    assert_same_answer(changed, answer(cold, chat, min_pixels=budget.min_pixels // 2))
    smaller = answer(pipe, chat, max_pixels=budget.min_pixels * 2)  # fewer patches: other token ids too
    assert smaller.prompt_tokens < first.prompt_tokens and smaller.cached_tokens == 0


def test_batched_rows_with_different_prefixes_each_reuse_their_own(engine, cold):
    pipe = Pipeline.load(engine)
    chats = [[user("Describe this picture briefly.", [random_image(96, 128, 5)])],
             [user("Write one sentence about the sea and the wind.")],
             [user("Describe this picture briefly.", [random_image(128, 96, 6)])]]
    firsts = [answer(pipe, chat) for chat in chats]
    follow_ups = [follow_up(chat, first, "Say more about that, please.") for chat, first in zip(chats, firsts)]
    fresh = [user("An unrelated question: how do bees make honey?")]
    batch = follow_ups + [fresh]
    warm = pipe.generate(batch, max_new_tokens=NEW_TOKENS, do_sample=False, logprobs=2)
    for result, first in zip(warm, firsts):
        assert first.prompt_tokens - 1 <= result.cached_tokens < result.prompt_tokens
    assert warm[-1].cached_tokens == 0
    for result, alone in zip(warm, cold.generate(batch, max_new_tokens=NEW_TOKENS, do_sample=False, logprobs=2)):
        assert_same_answer(result, alone)


def test_eviction_keeps_the_byte_budget_and_drops_the_least_recently_used(engine):
    prompts = {name: [user(f"{name} are my favourite fruit. Tell me about them.")]
               for name in ("Apples", "Pears", "Plums")}
    sizing = Pipeline.load(engine)
    sizes = []
    for prompt in prompts.values():
        before = sizing.reuse_stats()["bytes"]
        answer(sizing, prompt)
        sizes.append(sizing.reuse_stats()["bytes"] - before)
    assert min(sizes) > 0
    budget = int(2.5 * max(sizes))  # two entries fit, three do not
    assert 3 * min(sizes) > budget

    pipe = Pipeline.load(engine, cache_memory=budget)
    apples, pears, plums = prompts.values()
    for prompt in (apples, pears):
        answer(pipe, prompt)
    again = answer(pipe, apples)  # apples now used after pears
    assert again.cached_tokens == again.prompt_tokens - 1
    answer(pipe, plums)  # over budget: pears, the least recently used, goes
    stats = pipe.reuse_stats()
    assert stats["bytes"] <= budget and stats["evictions"] == 1 and stats["entries"] == 2
    again = answer(pipe, pears)  # at most the chat template's first tokens are shared with the others
    assert again.cached_tokens < MIN_REUSED_TOKENS
    assert pipe.reuse_stats()["bytes"] <= budget
    again = answer(pipe, plums)
    assert again.cached_tokens == again.prompt_tokens - 1


def test_an_entry_larger_than_the_budget_is_not_kept(engine):
    pipe = Pipeline.load(engine, cache_memory=1024)
    prompt = [user("Tell me a short story about a lighthouse keeper.")]
    answer(pipe, prompt)
    assert answer(pipe, prompt).cached_tokens == 0
    assert pipe.reuse_stats()["bytes"] == 0


def test_cache_memory_zero_turns_reuse_off(engine, cold):
    prompt = [user("Tell me a short story about a lighthouse keeper.")]
    answer(cold, prompt)
    assert answer(cold, prompt).cached_tokens == 0
    assert cold.reuse_stats() is None
    with pytest.raises(Exception, match="cache_memory"):
        Pipeline.load(engine, cache_memory=-1)


def test_cached_tokens_is_part_of_the_result(engine):
    pipe = Pipeline.load(engine)
    prompt = "Tell me a short story about a lighthouse keeper."
    pipe.generate(prompt, max_new_tokens=2, do_sample=False)
    again = pipe.generate(prompt, max_new_tokens=2, do_sample=False)
    assert again.to_dict()["cached_tokens"] == again.prompt_tokens - 1 >= MIN_REUSED_TOKENS


def test_a_stream_closed_early_leaves_what_went_through_the_decoder(engine, cold):
    pipe = Pipeline.load(engine)
    chat = [user("Tell me a short story about a lighthouse keeper.")]
    pieces = pipe.stream(chat, max_new_tokens=NEW_TOKENS, do_sample=False)
    next(pieces)
    pieces.close()
    warm = answer(pipe, chat)
    assert warm.cached_tokens == warm.prompt_tokens - 1
    assert_same_answer(warm, answer(cold, chat))


def _reference_pipeline(tiny_engine, tiny_checkpoints):
    from graph_passes.reference_backend import ReferenceBackend
    from runtime.engine_manifest import load_manifest

    engine = tiny_engine("gqa2-tied", backend="trt")
    manifest = load_manifest(engine)
    return Pipeline(engine, manifest, ReferenceBackend(engine, manifest))


def _torch_pipeline(tiny_engine, tiny_checkpoints):
    from model_src.torch_backend import checkpoint_pipeline

    return checkpoint_pipeline(tiny_checkpoints["gqa2-tied"], threads=1)


@pytest.mark.parametrize("make", [_reference_pipeline, _torch_pipeline], ids=["trt-graphs-reference", "torch"])
def test_other_backends_copy_prefixes_in_and_out_of_their_caches(tiny_engine, tiny_checkpoints, make):
    pipe = make(tiny_engine, tiny_checkpoints)
    cold = Pipeline(pipe.engine_dir, pipe.manifest, pipe.backend, cache_memory=0)
    first_chat = [user("Describe it.", [random_image(64, 64, 8)])]
    first = answer(pipe, first_chat)
    chat = follow_up(first_chat, first, "Why?")
    warm = answer(pipe, chat)
    assert warm.cached_tokens >= first.prompt_tokens - 1
    assert_same_answer(warm, answer(cold, chat))
