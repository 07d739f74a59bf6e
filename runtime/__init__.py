"""Light runtime for Qwen3-VL: numpy, Pillow, tokenizers and an engine; never torch or transformers.

    from runtime import Pipeline
    pipe = Pipeline.load("engines/demo")
    print(pipe.generate("Describe this image.", images=["photo.jpg"]).text)

Host-side logic shared by the build stages (image preprocessing, M-RoPE position ids, vision
position taps and rotary tables) lives here once, in numpy.
"""

from .pipeline import GenerationResult, Pipeline

__all__ = ["GenerationResult", "Pipeline"]
