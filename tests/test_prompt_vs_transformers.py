"""The prompt ids the runtime feeds the model: the published Qwen3-VL chat format, and transformers'.

Two oracles. transformers' tokenizer + apply_chat_template over the checkpoint, with each
`<|image_pad|>` expanded to its image's token count as Qwen3VLProcessor does (the processor itself needs
torchvision; Qwen2VLImageProcessorPil gives the counts). That catches a runtime that renders or
tokenizes a template differently. The checkpoint's template is the project's own, so the format it
should produce is also written out literally, as the published Qwen3-VL template renders it: that
catches a change to the shipped template, such as a lost generation prompt, which both sides would share.
"""

import json

import numpy as np
import pytest

from conftest import random_image
from runtime.image_processing import ImageProcessorSettings, preprocess_images
from runtime.prompt import IMAGE_PAD, PromptBuilder, load_chat_template, render_chat, user_message

transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")

IMAGE = {"type": "image"}
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# name -> (messages, image sizes (height, width) in order, the published template's rendering)
CASES = {
    "text only": (
        user_message("Hello, who are you?", 0),
        [],
        "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "one image": (
        user_message("Describe this image.", 1),
        [(96, 128)],
        f"<|im_start|>user\n{VISION}Describe this image.<|im_end|>\n<|im_start|>assistant\n",
    ),
    "several images": (
        user_message("Which of these is the widest?", 3),
        [(64, 160), (300, 200), (24, 900)],
        f"<|im_start|>user\n{VISION}{VISION}{VISION}Which of these is the widest?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "system prompt": (
        [
            {"role": "system", "content": "You are a careful assistant. Answer in one line."},
            {"role": "user", "content": [IMAGE, text("What is in the picture?")]},
        ],
        [(128, 96)],
        "<|im_start|>system\nYou are a careful assistant. Answer in one line.<|im_end|>\n"
        f"<|im_start|>user\n{VISION}What is in the picture?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "multi-turn chat": (
        [
            {"role": "user", "content": [IMAGE, text("What is this?")]},
            {"role": "assistant", "content": "A red square on a grey background."},
            {"role": "user", "content": [text("And this one, 日本語 and an émoji 🙂?\nTwo lines."), IMAGE]},
            {"role": "assistant", "content": [text("A blue circle.")]},
            {"role": "user", "content": "Which is larger?"},
        ],
        [(96, 96), (160, 64)],
        f"<|im_start|>user\n{VISION}What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA red square on a grey background.<|im_end|>\n"
        f"<|im_start|>user\nAnd this one, 日本語 and an émoji 🙂?\nTwo lines.{VISION}<|im_end|>\n"
        "<|im_start|>assistant\nA blue circle.<|im_end|>\n"
        "<|im_start|>user\nWhich is larger?<|im_end|>\n<|im_start|>assistant\n",
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints["gqa2-tied"]


@pytest.fixture(scope="module")
def builder(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    return PromptBuilder.from_folder(checkpoint, config["image_token_id"])


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def case_images(name: str) -> list:
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(CASES[name][1])]


def runtime_tokens_per_image(checkpoint, images) -> list[int]:
    if not images:
        return []
    settings = ImageProcessorSettings.from_preprocessor_config(
        json.loads((checkpoint / "preprocessor_config.json").read_text())
    )
    return preprocess_images(images, settings).tokens_per_image


def reference_tokens_per_image(checkpoint, images) -> list[int]:
    """grid.prod() // merge**2 from transformers' PIL image processor."""
    if not images:
        return []
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    grids = processor(images=images, return_tensors="np")["image_grid_thw"]
    return [int(np.prod(grid)) // processor.merge_size**2 for grid in grids]


def expand_pads(rendered: str, counts: list[int]) -> str:
    """Each <|image_pad|> in turn becomes its image's count of pads (what Qwen3VLProcessor does to the text)."""
    pieces = rendered.split(IMAGE_PAD)
    assert len(pieces) == len(counts) + 1, "one placeholder per image"
    return "".join(piece + IMAGE_PAD * count for piece, count in zip(pieces, counts)) + pieces[-1]


@pytest.mark.parametrize("name", CASES)
def test_prompt_ids_equal_transformers(name, checkpoint, builder, tokenizer):
    messages = CASES[name][0]
    images = case_images(name)
    counts = reference_tokens_per_image(checkpoint, images)

    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = tokenizer(expand_pads(rendered, counts), add_special_tokens=False)["input_ids"]
    # The template tokenized by apply_chat_template itself agrees before expansion.
    unexpanded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert unexpanded["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]

    ours = builder.encode(messages, runtime_tokens_per_image(checkpoint, images))
    assert ours.text == rendered
    assert ours.input_ids.tolist() == expected
    assert int((ours.input_ids == builder.image_token_id).sum()) == sum(counts)


@pytest.mark.parametrize("name", CASES)
def test_rendering_is_the_published_qwen3_vl_format(name, checkpoint):
    messages, _, published = CASES[name]
    assert render_chat(load_chat_template(checkpoint), messages) == published


@pytest.mark.parametrize("name", CASES)
def test_prompt_ids_are_the_published_format_tokenized(name, checkpoint, builder, tokenizer):
    messages, _, published = CASES[name]
    counts = runtime_tokens_per_image(checkpoint, case_images(name))
    expected = tokenizer(expand_pads(published, counts), add_special_tokens=False)["input_ids"]
    assert builder.encode(messages, counts).input_ids.tolist() == expected


def test_prompt_ends_with_the_assistant_turn(builder, tokenizer):
    """<|im_start|>assistant\\n: without it the model continues the user's turn instead of answering."""
    ids = builder.encode(user_message("Hi", 0), []).input_ids.tolist()
    assert ids[-3:] == [tokenizer.convert_tokens_to_ids("<|im_start|>")] + tokenizer("assistant\n")["input_ids"]
    assert ids[-3] == 151644  # <|im_start|>, model-facts.md
