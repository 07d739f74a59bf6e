"""What a user sees at the end of an answer and while it streams: generation stops at the
end-of-turn token (per row of a batch, the other rows unaffected), streamed text equals the final
text even when tokens split UTF-8 characters, and the command line prints the same text either way.

A random tiny model rarely picks an end-of-turn token or a token ending inside a character, so a
wrapper backend (tests/wrapper_backends.py) forces them: it runs the real ONNX Runtime backend and,
at chosen steps, lifts one token's logit in one row far above the rest (what a model that wants
that token does).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import random_image
from runtime import Pipeline
from wrapper_backends import wrapped

PROMPTS = ["Describe this image.", "Tell me a story."]


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine("gqa2-tied"))


def byte_token(tokenizer, byte: int) -> int:
    """The byte-level BPE token of one byte: printable Latin-1 bytes stand for themselves, the other
    68 for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(0x100 + others.index(byte))
    token = tokenizer.token_to_id(char)
    assert token is not None, byte
    return token


@pytest.mark.parametrize("stopping_row", [0, 1])
def test_an_end_of_turn_token_stops_its_row_and_leaves_the_other_as_alone(pipe, stopping_row):
    eos, step = pipe.manifest.model.eos_token_ids[0], 3
    images = [[random_image(64, 64, 5)], []]
    alone = [pipe.generate(p, images=i, max_new_tokens=10, do_sample=False) for p, i in zip(PROMPTS, images)]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 10 for r in alone)  # neither stops by itself

    forced = wrapped(pipe, {step: {stopping_row: eos}})
    together = forced.generate(PROMPTS, images=images, max_new_tokens=10, do_sample=False)
    stopped, other = together[stopping_row], together[1 - stopping_row]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == alone[stopping_row].token_ids[:step] + [eos]
    assert stopped.text == pipe.prompts.decode(alone[stopping_row].token_ids[:step])  # the token is not text
    expected = alone[1 - stopping_row]
    assert other.finish_reason == "length" and other.token_ids == expected.token_ids and other.text == expected.text


@pytest.mark.parametrize("which", [0, 1], ids=["im_end", "endoftext"])
def test_generation_and_streaming_end_at_either_end_token_without_another_decode_step(pipe, which):
    eos, step = pipe.manifest.model.eos_token_ids[which], 4
    alone = pipe.generate(PROMPTS[1], max_new_tokens=12, do_sample=False)
    assert alone.finish_reason == "length"
    forced = wrapped(pipe, {step: {0: eos}})
    result = forced.generate(PROMPTS[1], max_new_tokens=12, do_sample=False)
    assert result.finish_reason == "stop" and result.token_ids == alone.token_ids[:step] + [eos]
    assert forced.backend.decode_calls == step  # the end token itself is never fed back
    pieces = list(forced.stream(PROMPTS[1], max_new_tokens=12, do_sample=False))
    assert "".join(pieces) == result.text and forced.backend.decode_calls == step


def test_streamed_pieces_hold_back_split_characters_and_join_to_the_final_text(pipe):
    tokenizer = pipe.prompts.tokenizer

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    # "世" spelled as its three single-byte tokens; " 𝔘" is three tokens in the tokenizer's own
    # encoding, the character's four bytes split 2+1+1 after the space.
    split_cjk = [byte_token(tokenizer, b) for b in "世".encode()]
    answer = encode("Voilà: ") + split_cjk + encode("界") + encode(" 𝔘") + encode("!")
    expected = "Voilà: 世界 𝔘!"
    assert tokenizer.decode(answer) == expected
    partial = [t for t in answer if "\ufffd" in tokenizer.decode([t])]
    assert len(partial) >= 5  # the test really splits characters across tokens
    answer.append(pipe.manifest.model.eos_token_ids[0])

    forced = wrapped(pipe, {step: {0: token} for step, token in enumerate(answer)})
    result = forced.generate(PROMPTS[0], max_new_tokens=len(answer) + 4, do_sample=False)
    assert result.token_ids == answer and result.text == expected and result.finish_reason == "stop"
    pieces = list(forced.stream(PROMPTS[0], max_new_tokens=len(answer) + 4, do_sample=False))
    assert "".join(pieces) == expected
    assert all(piece and "\ufffd" not in piece for piece in pieces), pieces
    assert "世" in pieces and any(piece.endswith("𝔘") for piece in pieces), pieces  # whole, once complete


def test_a_character_cut_by_the_token_limit_streams_as_generate_shows_it(pipe):
    tokenizer = pipe.prompts.tokenizer
    cut = tokenizer.encode("Voilà: ", add_special_tokens=False).ids + [byte_token(tokenizer, b)
                                                                       for b in "世".encode()[:2]]
    forced = wrapped(pipe, {step: {0: token} for step, token in enumerate(cut)})
    result = forced.generate(PROMPTS[0], max_new_tokens=len(cut), do_sample=False)
    assert result.token_ids == cut and result.finish_reason == "length" and result.text.endswith("\ufffd")
    pieces = list(forced.stream(PROMPTS[0], max_new_tokens=len(cut), do_sample=False))
    assert "".join(pieces) == result.text and pieces[-1].endswith("\ufffd"), pieces


def test_command_line_streams_the_text_it_reports_as_json(tiny_engine):
    """`qwen3vl run` without --json streams pieces as they come; with --json it prints generate()'s
    result: the same text, and a newline after the stream. This prompt's greedy answer on this
    engine is not ASCII, so stdout's encoding counts too. (Split characters are the test above: a
    random model's own answers rarely split one.)"""
    command = [sys.executable, "-m", "commands", "run", "--engine", str(tiny_engine("gqa2-tied")), "--greedy",
               "--prompt", "Write a short poem about the sea.", "--max-new-tokens", "32"]
    streamed = subprocess.run(command, capture_output=True, timeout=120)
    reported = subprocess.run(command + ["--json"], capture_output=True, timeout=120)
    assert streamed.returncode == 0 and reported.returncode == 0, (streamed.stderr, reported.stderr)
    result = json.loads(reported.stdout)
    assert len(result["token_ids"]) == 32 and not result["text"].isascii()
    assert streamed.stdout.decode("utf-8") == result["text"] + "\n"
