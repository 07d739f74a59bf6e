"""Which format each decoder weight of an int8/int4 build gets, and why (the manifest's
`quantization` record says what each got).

- default: the precision's bits at --block-size, --scale-search.
- head: the tied embedding/lm_head (or an untied lm_head and its embedding) at --head-bits, 8 by
  default (a weight budget places it instead unless --head-bits is given): read whole for every token, it is the one weight whose errors land on the logits directly
  (llama.cpp gives it 6 bits in its 4-bit types). At 8 bits its block is 128: rounding then is already
  ~1/16 of the 4-bit layers' error and the longer block saves 3% of the bytes read per token.
- sensitive: with --keep-sensitive N, the N decoder linears whose quantization alone moves the output
  most (export/sensitivity.py), in the head's 8-bit format.
- budget: with a weight budget (the int4 default), every decoder linear, and the head unless
  --head-bits fixes it, in the format export/precision_allocation.py chose for it (4 bits in blocks of
  128/64/32 or 8 bits) so that the bytes read per token fit the budget.
"""

from __future__ import annotations

from graph_passes.quantize_weights import SCALE_SEARCHES, WeightFormat
from runtime.errors import Qwen3VLError

HEAD_WEIGHTS = ("language_model.embed_tokens.weight", "lm_head.weight")
HEAD_BITS = (4, 8)
EIGHT_BIT_BLOCK_SIZE = 128
# The body's scales by default: measured on the 2B shape, "clip" (searched per block) gives ~30% less
# squared weight error than max-abs at 4 bits (docs/quantization.md has the KL figures).
DEFAULT_SCALE_SEARCH = "clip"


def body_format(precision: str, block_size: int, symmetric: bool, scale_search: str) -> WeightFormat:
    if scale_search not in SCALE_SEARCHES:
        raise Qwen3VLError(f"unsupported scale search {scale_search!r} (choose from {', '.join(SCALE_SEARCHES)})")
    return WeightFormat(4 if precision == "int4" else 8, block_size, symmetric, scale_search)


def eight_bit(body: WeightFormat) -> WeightFormat:
    return WeightFormat(8, max(body.block_size, EIGHT_BIT_BLOCK_SIZE), body.symmetric, body.scale_search)


def weight_overrides(precision: str, body: WeightFormat, head_bits: int | None, sensitive: list[str] = (),
                     allocated: dict[str, WeightFormat] | None = None) -> dict[str, tuple[WeightFormat, str]]:
    """Weight name -> (format, reason) for every weight that does not get `body`."""
    if head_bits is None:
        head_bits = 8 if precision == "int4" else None
    if head_bits is not None and head_bits not in HEAD_BITS:
        raise Qwen3VLError(f"unsupported head bits {head_bits} (choose from {', '.join(map(str, HEAD_BITS))})")
    overrides: dict[str, tuple[WeightFormat, str]] = {}
    if head_bits is not None and head_bits != body.bits:
        head = eight_bit(body) if head_bits == 8 else WeightFormat(4, body.block_size, body.symmetric,
                                                                   body.scale_search)
        overrides.update({name: (head, "head") for name in HEAD_WEIGHTS})
    if body.bits < 8:
        overrides.update({name: (eight_bit(body), "sensitive") for name in sensitive})
    overrides.update({name: (form, "budget") for name, form in (allocated or {}).items() if form != body})
    return overrides


def head_format(precision: str, body: WeightFormat, head_bits: int | None) -> WeightFormat:
    """The format weight_overrides gives the tied embedding/lm_head."""
    return weight_overrides(precision, body, head_bits).get(HEAD_WEIGHTS[0], (body, "default"))[0]
