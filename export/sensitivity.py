"""How much each decoder linear's quantization alone moves the model's output, for `qwen3vl build
--keep-sensitive N` (the N most sensitive stay at 8 bits).

On the checkpoint in PyTorch, fp32, over a short built-in text: one full-precision forward caches
every layer's input; then, for each linear, only that weight is replaced by quantize -> dequantize
(graph_passes.quantize_weights' numpy reference, in the format the build would give it) and the
decoder re-runs from that weight's layer onward. The sensitivity is the mean over the calibration
positions of KL(P_fp32 || P_quantized) of the next-token distributions. No calibration data: the
text only has to exercise the weights, and the weights are what is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from graph_passes.quantize_weights import WeightFormat, round_trip
from model_src.checkpoint import checkpoint_name, iter_tensors, weight_files
from model_src.config import load_config
from model_src.model import Qwen3VL
from model_src.text import MRotaryEmbedding
from runtime.errors import CheckpointError

from .precision_allocation import placed_parameters

# The linears of one decoder layer, as the graph names their weights (language_model.layers.N.<this>.weight).
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
HEAD_NAME, UNTIED_HEAD_NAME = "language_model.embed_tokens.weight", "lm_head.weight"  # as the graph names them
CALIBRATION_TOKENS = 32
CALIBRATION_TEXT = (
    "The harbour was quiet before dawn. Fishing boats rocked against the pier while gulls argued over "
    "scraps, and an old man counted crates of ice by lantern light. In the market square the baker "
    "opened her shutters; the smell of bread drifted down to the water, where a girl with a red scarf "
    "was sketching the lighthouse in a notebook full of numbers, maps and half-finished letters."
)


# Peak resident memory of a build that measures sensitivities, per byte of the text model's weights in
# FP32 (the pass holds them all): measured on the 2B shape, 11.2 GB for 6.9 GB of weights.
PEAK_PER_FP32_WEIGHT_BYTE = 1.65


def memory_needed(config) -> int:
    """Bytes a build needs free to measure the decoder's sensitivities (export/build_engine.py checks
    it first: a clear refusal, or the int4 default's fallback, instead of the kernel's OOM killer)."""
    t = config.text
    norms = t.num_hidden_layers * 2 * (t.hidden_size + t.head_dim)
    untied_embedding = 0 if config.tie_word_embeddings else t.vocab_size * t.hidden_size
    return int(PEAK_PER_FP32_WEIGHT_BYTE * 4 * (placed_parameters(t, head_placed=True) + norms + untied_embedding))


def weight_name(layer: int, linear: str) -> str:
    return f"language_model.layers.{layer}.{linear}.weight"


@torch.no_grad()
def linear_sensitivities(checkpoint_dir: str | Path, form: WeightFormat, tokens: int = CALIBRATION_TOKENS,
                         progress: Callable[[str], None] = lambda message: None,
                         include_head: bool = False) -> dict[str, float]:
    """Weight name -> mean KL (nats) of the final logits when that weight alone is quantized in `form`.
    With `include_head`, the lm_head too (HEAD_NAME or UNTIED_HEAD_NAME): a tied table quantized
    where the layers read it as well (the embedding rows) and where it makes the logits."""
    checkpoint_dir = Path(checkpoint_dir)
    decoder, head = _load_text_model(checkpoint_dir)
    ids = _calibration_ids(checkpoint_dir, tokens)
    s = ids.shape[1]
    positions = torch.arange(s).expand(3, 1, s)
    cos, sin = decoder.rotary_emb(positions, torch.float32)
    buffers = (decoder.config.num_key_value_heads, decoder.config.head_dim)
    empty = torch.zeros((1, buffers[0], s, buffers[1]))
    seqlens_k, total = torch.tensor([s - 1], dtype=torch.int32), torch.tensor([s], dtype=torch.int32)

    def run_from(layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layers `layer`.. on a batch of rows (B, S, hidden) -> next-token log-probabilities (B, S, vocab)."""
        b = x.shape[0]
        rows = (cos.expand(b, -1, -1), sin.expand(b, -1, -1), empty.expand(b, -1, -1, -1),
                empty.expand(b, -1, -1, -1), seqlens_k.expand(b), total)
        for block in decoder.layers[layer:]:
            x, _, _ = block(x, rows[0], rows[1], rows[2], rows[3], rows[4], rows[5])
        return torch.log_softmax(decoder.norm(x) @ head.T, dim=-1)

    inputs = [decoder.embed_tokens(ids)]  # text only: the deepstack additions are zero
    for block in decoder.layers:
        inputs.append(block(inputs[-1], cos, sin, empty, empty, seqlens_k, total)[0])
    reference = torch.log_softmax(decoder.norm(inputs[-1])[0] @ head.T, dim=-1)
    reference_p = reference.exp()

    found: dict[str, float] = {}
    start, count = time.perf_counter(), len(decoder.layers) * len(LAYER_LINEARS)
    for layer, block in enumerate(decoder.layers):
        # This layer's output with each of its linears quantized in turn, then the layers after it
        # on all of them as one batch (7 rows: the weights are read once per layer, not 7 times).
        outputs = []
        for linear in LAYER_LINEARS:
            module = block.get_submodule(linear)
            original = module.weight.data
            module.weight.data = torch.from_numpy(round_trip(original.numpy(), form))
            outputs.append(block(inputs[layer], cos, sin, empty, empty, seqlens_k, total)[0])
            module.weight.data = original
        logprobs = run_from(layer + 1, torch.cat(outputs))
        for linear, row in zip(LAYER_LINEARS, logprobs):
            found[weight_name(layer, linear)] = float((reference_p * (reference - row)).sum(-1).mean())
        done = len(found)
        worst = max((found[weight_name(layer, linear)], linear) for linear in LAYER_LINEARS)
        progress(f"sensitivity: layer {layer} done ({done}/{count} linears, {time.perf_counter() - start:.0f} s); "
                 f"most sensitive here {worst[1]} KL {worst[0]:.2e}")
    if include_head:
        tied = head is decoder.embed_tokens.weight
        quantized = torch.from_numpy(round_trip(head.numpy(), form))
        x = torch.nn.functional.embedding(ids, quantized) if tied else inputs[-1]
        if tied:
            for block in decoder.layers:
                x = block(x, cos, sin, empty, empty, seqlens_k, total)[0]
        logprobs = torch.log_softmax(decoder.norm(x)[0] @ quantized.T, dim=-1)
        name = HEAD_NAME if tied else UNTIED_HEAD_NAME
        found[name] = float((reference_p * (reference - logprobs)).sum(-1).mean())
        progress(f"sensitivity: the lm_head ({'tied' if tied else 'untied'}) KL {found[name]:.2e} "
                 f"({time.perf_counter() - start:.0f} s)")
    return found


def most_sensitive(sensitivities: dict[str, float], count: int) -> list[str]:
    return sorted(sensitivities, key=lambda name: -sensitivities[name])[:count]


def _load_text_model(checkpoint_dir: Path):
    """The text decoder in fp32 and the lm_head weight (the embedding when tied); no vision weights."""
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = Qwen3VL(config)
    decoder = model.language_model
    ours = {checkpoint_name(f"language_model.{name}"): name for name in decoder.state_dict()}
    if model.lm_head is not None:
        ours[checkpoint_name("lm_head.weight")] = "lm_head"
    files = weight_files(checkpoint_dir)
    missing = [name for name in ours if name not in files]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: missing tensor {missing[0]}")
    state, head = {}, None
    for name, tensor in iter_tensors(files, list(ours)):
        if ours[name] == "lm_head":
            head = tensor.to(torch.float32)
        else:
            state[ours[name]] = tensor.to(torch.float32)
    decoder.load_state_dict(state, assign=True, strict=True)
    decoder.rotary_emb = MRotaryEmbedding(config.text)  # its buffers were made on meta
    decoder.eval()
    return decoder, decoder.embed_tokens.weight if head is None else head


def _calibration_ids(checkpoint_dir: Path, tokens: int) -> torch.Tensor:
    tokenizer = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
    ids = tokenizer.encode(CALIBRATION_TEXT).ids
    while len(ids) < tokens:
        ids = ids + ids
    return torch.tensor([ids[:tokens]], dtype=torch.int64)
