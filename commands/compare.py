"""`qwen3vl compare`: the engine's ONNX Runtime graphs against its TensorRT graphs, on the same inputs,
with Polygraphy's runners and comparator.

Two executors of the same engine: ONNX Runtime on the CPU (`vision.onnx`, `decoder.onnx`) against
TensorRT (`*.trt.onnx` with the plugin library; on a machine with TensorRT and a GPU) or against the
plugins' numpy references on the CPU (graph_passes/polygraphy_reference_runner.py, anywhere).
The inputs come from the project's own host logic: `Pipeline.prepare` of one image and prompt (the
bench's by default). Three comparisons, each one `Comparator.run` + `compare_accuracy`:
  vision   the packed patches and host position inputs;
  prefill  the whole prompt as the decoder's first chunk, ONNX Runtime's image features placed by
           the host, KV buffers zero;
  decode   one token (the prefill's greedy pick) over ONNX Runtime's prefill KV cache.
Marked intermediates (--mark-all, --mark) find where two graphs first part: the TensorRT passes keep
the names of the tensors at the boundaries of the nodes they replace, so tensors of the same name
in both graphs hold the same values. --mark-all marks the residual stream of every block, the
tensors named `/language_model/layers.N/Add_output_0` (after attention) and `.../Add_1_output_0`
(after the MLP), `/visual/blocks.N/...` likewise, that both graphs produce.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Default (atol, rtol, error statistic) by the engine's precision; an output fails only when the
# statistic is outside both tolerances (Polygraphy's rule; "elemwise": any element outside both).
# fp32: the executors differ only in summation order. fp16: one rounding per stored tensor.
# int8/int4: both executors quantize activations to int8 per block before the weight-only GEMMs
# (accuracy_level 4: ONNX Runtime's CPU kernel, the plugin's dp4a paths, the reference runner), so an
# input that differs in the last bit can round to the next int8 code: single elements jump by a
# quantization step and the jumps grow through the layers. The mean error is the statistic there.
TOLERANCES = {"fp32": (1e-3, 1e-3, "elemwise"), "fp16": (2e-2, 2e-2, "elemwise"),
              "int8": (1e-1, 1e-1, "mean"), "int4": (1e-1, 1e-1, "mean")}
ERROR_STATS = ("elemwise", "max", "mean", "median", "quantile")
RESIDUAL_STREAM = re.compile(r"^/(language_model/layers|visual/blocks)\.(\d+)/Add(_1)?_output_0$")
PARTS = ("vision", "prefill", "decode")
GRAPHS = {"vision": ("vision", "vision_trt"), "prefill": ("decoder", "decoder_trt"),
          "decode": ("decoder", "decoder_trt")}
ORT_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def add_parser(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser("compare", help="ONNX Runtime vs TensorRT graphs of an engine, on polygraphy",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, help="engine folder built with --backend trt")
    parser.add_argument("--against", choices=("auto", "tensorrt", "reference"), default="auto",
                        help="what runs the TensorRT graphs: TensorRT with the plugin library, or the plugins' "
                             "numpy references on the CPU (test-sized engines); auto: TensorRT where it can run")
    parser.add_argument("--part", choices=("all", *PARTS), default="all", help="which comparison (default all)")
    parser.add_argument("--image", help="image file (default: the bench's assets/sample.png)")
    parser.add_argument("--prompt", help="prompt (default: the bench's)")
    parser.add_argument("--atol", action="append", default=[], metavar="[NAME:]VALUE",
                        help="absolute tolerance, for every output or for output NAME; repeatable "
                             "(default by precision: fp32 1e-3, fp16 2e-2, int8/int4 0.1)")
    parser.add_argument("--rtol", action="append", default=[], metavar="[NAME:]VALUE",
                        help="relative tolerance, like --atol")
    parser.add_argument("--check-error-stat", choices=ERROR_STATS,
                        help="what the tolerances bound (default: elemwise for fp32/fp16, mean for int8/int4)")
    marks = parser.add_mutually_exclusive_group()
    marks.add_argument("--mark-all", action="store_true",
                       help="also compare the residual stream after every block (tensors both graphs name alike)")
    marks.add_argument("--mark", nargs="+", default=[], metavar="NAME", help="also compare these tensors")
    parser.add_argument("--plugins", help="plugin library for --against tensorrt (default: build/plugins/)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(handler=run)


@dataclass
class PartReport:
    part: str
    passed: bool
    first_divergence: str | None
    outputs: list[dict] = field(default_factory=list)


def run(args) -> int:
    from runtime.engine_manifest import load_manifest
    from runtime.errors import Qwen3VLError

    engine = Path(args.engine)
    manifest = load_manifest(engine)
    if not {"vision_trt", "decoder_trt"} <= set(manifest.files):
        raise Qwen3VLError(f"{engine}: has no TensorRT graphs to compare (build it with --backend trt)")
    against, why = resolve_against(args.against, args.plugins)
    if why:
        print(f"compare: {why}", file=sys.stderr)
    default = TOLERANCES[manifest.precision]
    atol, rtol = parse_tolerances(args.atol, default[0]), parse_tolerances(args.rtol, default[1])
    tolerances = (atol, rtol, args.check_error_stat or default[2])

    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # Polygraphy logs on stdout, which is for our report
    try:
        report = compare_engine(engine, manifest, against, args, tolerances)
    except PolygraphyException as exc:
        raise Qwen3VLError(f"polygraphy: {(str(exc).strip().splitlines() or ['failed'])[-1]}") from None
    if args.json:
        print(json.dumps(report))
    else:
        print("\n".join(report_lines(report)))
    return 0 if report["passed"] else 1


def resolve_against(choice: str, plugins: str | None) -> tuple[str, str | None]:
    """("tensorrt" | "reference", a line saying why auto chose the reference, or None)."""
    if choice == "reference":
        return choice, None
    from runtime.environment import find_plugin_library, probe_gpu, probe_tensorrt
    from runtime.errors import Qwen3VLError

    gpu = probe_gpu()
    version, problem = probe_tensorrt() if gpu is not None else (None, None)
    if gpu is None:
        why = "no NVIDIA GPU found"
    elif version is None:
        why = f"TensorRT is not importable ({problem})"
    elif not (plugins or find_plugin_library()):
        why = "no plugin library: run `make plugins` or give --plugins"
    else:
        return "tensorrt", None
    if choice == "tensorrt":
        raise Qwen3VLError(f"--against tensorrt: {why}")
    return "reference", f"against the plugins' numpy references on the CPU ({why})"


def parse_tolerances(values: list[str], default: float) -> dict[str, float]:
    """["1e-3", "logits:1e-2"] -> {"": 1e-3, "logits": 1e-2} (Polygraphy's per-output form)."""
    from runtime.errors import Qwen3VLError

    out = {"": default}
    for value in values:
        name, _, number = value.rpartition(":")
        try:
            out[name] = float(number)
        except ValueError:
            raise Qwen3VLError(f"tolerance {value!r}: expected VALUE or NAME:VALUE") from None
    return out


# -- the comparison ----------------------------------------------------------------------------------

def compare_engine(engine: Path, manifest, against: str, args, tolerances: tuple) -> dict:
    import onnx

    from runtime import Pipeline

    from .bench import DEFAULT_PROMPT, SAMPLE_IMAGE

    image, prompt = args.image or str(SAMPLE_IMAGE), args.prompt or DEFAULT_PROMPT
    # The host logic every backend shares; the Pipeline's backend is not used by prepare().
    batch = Pipeline(engine, manifest, backend=None).prepare([prompt], [[image]])
    graphs = {key: onnx.load(str(engine / manifest.files[key]), load_external_data=False)
              for key in ("vision", "vision_trt", "decoder", "decoder_trt")}
    marks = {part: marked_tensors(graphs[GRAPHS[part][0]], graphs[GRAPHS[part][1]], args.mark_all, args.mark)
             for part in ("vision", "prefill")}
    marks["decode"] = marks["prefill"]
    outputs = {o.name for key in graphs for o in graphs[key].graph.output}  # compared anyway
    unknown = [n for n in args.mark if n not in marks["vision"] + marks["prefill"] and n not in outputs]
    if unknown:
        from runtime.errors import Qwen3VLError

        examples = residual_stream(graphs["decoder"], graphs["decoder_trt"])[:2]
        raise Qwen3VLError(f"--mark {unknown[0]}: not a tensor both graphs produce (e.g. {', '.join(examples)})")
    wanted = PARTS if args.part == "all" else (args.part,)
    host = batch.vision.host
    vision_feeds = dict(zip(("pixel_values", "pos_indices", "pos_weights", "rotary_cos", "rotary_sin",
                             "frame_patch_index", "frame_patch_mask", "patch_frame_slot"),
                            (batch.vision.pixel_values, host.pos_indices, host.pos_weights, host.rotary_cos,
                             host.rotary_sin, host.frame_patch_index, host.frame_patch_mask, host.patch_frame_slot)))
    parts, ort_out = [], {}
    ort_out["vision"] = run_part("vision", engine, manifest, graphs, vision_feeds, marks, against, args, tolerances,
                                 parts if "vision" in wanted else None)
    if wanted != ("vision",):
        features = features_of(ort_out["vision"])
        prefill = prefill_feeds(batch, features, manifest, graphs["decoder"])
        ort_out["prefill"] = run_part("prefill", engine, manifest, graphs, prefill, marks, against, args,
                                      tolerances, parts if "prefill" in wanted else None)
        if "decode" in wanted:
            decode = decode_feeds(batch, prefill, ort_out["prefill"], manifest)
            run_part("decode", engine, manifest, graphs, decode, marks, against, args, tolerances, parts)
    return {
        "engine": str(engine), "precision": manifest.precision,
        "runners": ["onnxruntime-cpu", "tensorrt" if against == "tensorrt" else "plugin-reference"],
        "inputs": {"image": image, "prompt": prompt, "prompt_tokens": int(batch.lengths[0]),
                   "image_tokens": batch.image_tokens},
        "tolerances": dict(zip(("atol", "rtol", "check_error_stat"), tolerances)),
        "marking_rule": "residual stream: /language_model/layers.N/Add[_1]_output_0, /visual/blocks.N/Add[_1]_output_0",
        "parts": [p.__dict__ for p in parts],
        "passed": all(p.passed for p in parts),
    }


def run_part(part, engine, manifest, graphs, feeds, marks, against, args, tolerances, reports):
    """Runs ONNX Runtime (and, when `reports` is a list, the other executor) on `feeds` through
    Polygraphy; appends the comparison to `reports`. Returns ONNX Runtime's outputs."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    ort_graph, trt_graph = GRAPHS[part]
    extra = marks[part] if reports is not None else []
    runners = [ort_runner(engine / manifest.files[ort_graph], graphs[ort_graph], extra)]
    if reports is not None:
        runners.append(other_runner(against, engine / manifest.files[trt_graph], graphs[trt_graph], extra, feeds,
                                    args.plugins))
    results = Comparator.run(runners, data_loader=[feeds])
    ort_outputs = dict(results[runners[0].name][0])
    if reports is None:
        return ort_outputs
    atol, rtol, stat = tolerances
    compare = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat=stat)
    accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    compared = accuracy[0][(runners[0].name, runners[1].name)][0]
    order = topological_order(graphs[ort_graph])
    outputs = []
    for name in sorted(compared, key=lambda n: order.get(n, len(order))):
        verdict = compared[name]
        outputs.append({"name": name, "marked": name in extra, "passed": bool(verdict),
                        "max_absdiff": verdict.max_absdiff, "max_reldiff": verdict.max_reldiff,
                        "mean_absdiff": verdict.mean_absdiff, "mean_reldiff": verdict.mean_reldiff,
                        "atol": atol.get(name, atol[""]), "rtol": rtol.get(name, rtol[""])})
    first = next((o["name"] for o in outputs if not o["passed"]), None)
    reports.append(PartReport(part, first is None, first, outputs))
    return ort_outputs


def ort_runner(path: Path, graph, marks: list[str]):
    """Polygraphy's OnnxrtRunner on the engine's graph (weights read from the engine folder)."""
    import onnxruntime as ort
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner

    model = OnnxFromPath(str(path), ignore_external_data=True)
    if marks:
        model = ModifyOutputs(model, outputs=[o.name for o in graph.graph.output] + marks)

    def session():
        options = ort.SessionOptions()
        options.add_session_config_entry(ORT_EXTERNAL_DATA_FOLDER, str(path.parent))
        return ort.InferenceSession(model().SerializeToString(), options, providers=["CPUExecutionProvider"])

    return OnnxrtRunner(session, name="onnxruntime-cpu")


def other_runner(against: str, path: Path, graph, marks: list[str], feeds: dict, plugins: str | None):
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath

    outputs = [o.name for o in graph.graph.output] + marks
    if against == "reference":
        from graph_passes.polygraphy_reference_runner import PluginReferenceRunner

        model = OnnxFromPath(str(path))  # with its weights: the references compute on them
        return PluginReferenceRunner(ModifyOutputs(model, outputs=outputs) if marks else model,
                                     name="plugin-reference")
    return tensorrt_runner(path, graph, outputs if marks else None, feeds, plugins)


def tensorrt_runner(path: Path, graph, outputs: list[str] | None, feeds: dict, plugins: str | None):
    """TrtRunner on the TensorRT graph: plugin library loaded before parsing, one optimization profile
    fixed at these inputs' shapes, no FP16 flag (the graph's own types decide)."""
    from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, LoadPlugins, ModifyNetworkOutputs,
                                        NetworkFromOnnxPath, Profile, TrtRunner)

    from runtime.environment import find_plugin_library
    from runtime.errors import Qwen3VLError

    library = plugins or find_plugin_library()
    if not library:
        raise Qwen3VLError("no plugin library: run `make plugins` or give --plugins")
    network = LoadPlugins(plugins=[str(library)], obj=NetworkFromOnnxPath(str(path)))
    if outputs:
        network = ModifyNetworkOutputs(network, outputs=outputs)
    profile = Profile()
    for tensor in graph.graph.input:
        shape = tuple(feeds[tensor.name].shape)
        profile.add(tensor.name, min=shape, opt=shape, max=shape)
    return TrtRunner(EngineFromNetwork(network, config=CreateConfig(profiles=[profile])), name="tensorrt")


# -- inputs ------------------------------------------------------------------------------------------

def features_of(vision_outputs: dict):
    from runtime.backend import ImageFeatures

    return ImageFeatures(vision_outputs["image_embeds"], vision_outputs["deepstack_embeds"])


def prefill_feeds(batch, features, manifest, decoder_graph) -> dict:
    """The whole prompt as the decoder's first chunk (as runtime/generate.py's prefill makes it), over
    zeroed KV buffers as long as the prompt."""
    import numpy as np
    import onnx

    from runtime.graph_io import past_names

    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
             for i in decoder_graph.graph.input}
    chunk = batch.chunk(features, types["visual_embeds"])
    m, (b, s) = manifest.model, chunk.input_ids.shape
    zeros = np.zeros((b, m.num_key_value_heads, s, m.head_dim), dtype=types[past_names(1)[0]])
    visual = chunk.visual_embeds if chunk.visual_embeds is not None else np.zeros((b, s, m.hidden_size), zeros.dtype)
    deepstack = (chunk.deepstack_embeds if chunk.deepstack_embeds is not None
                 else np.zeros((m.num_deepstack, b, s, m.hidden_size), zeros.dtype))
    feeds = {"input_ids": chunk.input_ids, "visual_embeds": visual, "deepstack_embeds": deepstack,
             "position_ids": chunk.position_ids, "seqlens_k": chunk.seqlens_k,
             "total_sequence_length": np.asarray([chunk.total_sequence_length], dtype=np.int32),
             "logits_index": chunk.logits_index}
    feeds.update({name: zeros for name in past_names(m.num_hidden_layers)})
    return {name: np.ascontiguousarray(value) for name, value in feeds.items()}


def decode_feeds(batch, prefill: dict, ort_prefill: dict, manifest) -> dict:
    """One decode step after the prefill: its greedy token, over ONNX Runtime's prefill KV cache with
    one free slot."""
    import numpy as np

    from runtime.backend import DecoderChunk
    from runtime.graph_io import past_names, present_names

    m = manifest.model
    past = batch.lengths.copy()
    token = np.argmax(ort_prefill["logits"], axis=-1)
    step = DecoderChunk.decode_step(token, batch.decode_positions(past), past)
    b = step.batch
    feeds = {"input_ids": step.input_ids,
             "visual_embeds": np.zeros((b, 1, m.hidden_size), prefill["visual_embeds"].dtype),
             "deepstack_embeds": np.zeros((m.num_deepstack, b, 1, m.hidden_size), prefill["visual_embeds"].dtype),
             "position_ids": step.position_ids, "seqlens_k": step.seqlens_k,
             "total_sequence_length": np.asarray([step.total_sequence_length], dtype=np.int32),
             "logits_index": step.logits_index}
    for past_name, present_name in zip(past_names(m.num_hidden_layers), present_names(m.num_hidden_layers)):
        cache = ort_prefill[present_name]
        feeds[past_name] = np.concatenate([cache, np.zeros_like(cache[:, :, :1])], axis=2)
    return {name: np.ascontiguousarray(value) for name, value in feeds.items()}


# -- which tensors ----------------------------------------------------------------------------------

def produced(graph) -> list[str]:
    return [name for node in graph.graph.node for name in node.output if name]


def residual_stream(ort_graph, trt_graph) -> list[str]:
    """The residual stream of every block that both graphs produce, in the ONNX Runtime graph's order."""
    theirs = set(produced(trt_graph))
    return [n for n in produced(ort_graph) if n in theirs and RESIDUAL_STREAM.match(n)]


def marked_tensors(ort_graph, trt_graph, mark_all: bool, names: list[str]) -> list[str]:
    if mark_all:
        return residual_stream(ort_graph, trt_graph)
    both = set(produced(ort_graph)) & set(produced(trt_graph))
    outputs = {o.name for o in ort_graph.graph.output}
    return [n for n in names if n in both and n not in outputs]


def topological_order(graph) -> dict[str, int]:
    """Tensor name -> index of the node that produces it."""
    return {name: i for i, node in enumerate(graph.graph.node) for name in node.output if name}


# -- the report -----------------------------------------------------------------------------------------

def report_lines(report: dict) -> list[str]:
    out = [f"{report['engine']} ({report['precision']}): {report['runners'][0]} vs {report['runners'][1]}, "
           f"{report['inputs']['prompt_tokens']} prompt tokens ({report['inputs']['image_tokens']} from the image), "
           f"checking the {report['tolerances']['check_error_stat']} error"]
    for part in report["parts"]:
        status = "PASSED" if part["passed"] else f"FAILED, first divergence: {part['first_divergence']}"
        out += ["", f"{part['part']}: {status}"]
        width = max(len(o["name"]) for o in part["outputs"])
        for o in part["outputs"]:
            out.append(f"  {'ok  ' if o['passed'] else 'FAIL'} {o['name']:<{width}}  max abs {o['max_absdiff']:.3g}  "
                       f"mean abs {o['mean_absdiff']:.3g}  (atol {o['atol']:g}, rtol {o['rtol']:g})"
                       f"{'  [marked]' if o['marked'] else ''}")
    out += ["", "PASSED" if report["passed"] else "FAILED: outside tolerance"]
    return out
