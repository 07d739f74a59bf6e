"""Light runtime for Qwen3-VL: numpy, Pillow, tokenizers and an engine; never torch or transformers.

Host-side logic shared by the build stages (image preprocessing, M-RoPE position ids, vision
position taps and rotary tables) lives here once, in numpy.
"""
