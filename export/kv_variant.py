"""An engine with another KV cache storage type, derived from a built one without re-exporting it.

  python -m export.kv_variant --engine eng-int4 --out eng-int4-kv-int8 --kv-dtype int8 [--kv-scales per_tensor]

The new folder holds the same weights (hard links where the filesystem allows, else copies), so
engines that differ only in their KV cache can be compared exactly; the decoder graph gets the pass
`qwen3vl build --kv-dtype` applies (int8: scales calibrated on this engine, export/kv_calibration.py)
and the manifest records it. The source must hold a float cache (fp32, or fp16 in fp16 builds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from graph_passes.kv_cache_dtype import GRANULARITIES, ORT_KV_TYPES, kv_cache_dtype
from graph_passes.pass_runner import run_passes, update_engine_manifest
from runtime.engine_manifest import load_manifest, update_manifest
from runtime.errors import Qwen3VLError

from .kv_calibration import calibrate_kv_scales


def derive_kv_variant(engine_dir: str | Path, out_dir: str | Path, kv_dtype: str, granularity: str = "per_channel",
                      progress=lambda message: None) -> Path:
    source, out = Path(engine_dir), Path(out_dir)
    manifest = load_manifest(source)
    if kv_dtype not in ORT_KV_TYPES:
        raise Qwen3VLError(f"unsupported KV cache type {kv_dtype!r} (choose from {', '.join(ORT_KV_TYPES)})")
    if (manifest.kv_dtype or "fp32") == "int8":
        raise Qwen3VLError(f"{source}: its KV cache is already int8; derive from the float-cache engine")
    if manifest.backend != "ort":
        raise Qwen3VLError(f"{source}: a --backend {manifest.backend} engine; derive from an ONNX Runtime one")
    if out.exists():
        raise Qwen3VLError(f"{out} exists; give a new folder")
    out.mkdir(parents=True)
    try:
        for item in source.iterdir():
            if item.is_file() and not item.name.startswith("."):
                try:
                    os.link(item, out / item.name)  # the graph and manifest are replaced, never written through
                except OSError:
                    shutil.copy2(item, out / item.name)
        scales = calibrate_kv_scales(out, manifest, progress) if kv_dtype == "int8" else None
        changed = run_passes(out / manifest.files["decoder"], [kv_cache_dtype(kv_dtype, scales, granularity)])
        update_engine_manifest(out, [f"decoder:{name}" for name in changed])
        update_manifest(out, lambda body: body.update(kv_dtype=kv_dtype))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    progress(f"{out}: KV cache {kv_dtype} ({', '.join(changed) or 'unchanged'})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.kv_variant", description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, help="the built engine (float KV cache)")
    parser.add_argument("--out", required=True, help="new engine folder")
    parser.add_argument("--kv-dtype", required=True, choices=tuple(ORT_KV_TYPES))
    parser.add_argument("--kv-scales", default="per_channel", choices=GRANULARITIES, help="int8 scale granularity")
    args = parser.parse_args(argv)
    try:
        derive_kv_variant(args.engine, args.out, args.kv_dtype, args.kv_scales,
                          lambda message: print(message, file=sys.stderr, flush=True))
    except Qwen3VLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
