// Registers every plugin creator of libqwen3vl_plugins.so with TensorRT's global registry when the
// library is loaded (dlopen, ctypes.CDLL, trtexec --plugins / --staticPlugins), before an ONNX
// graph with the plugin nodes is parsed. A new plugin adds its header and one line here.
//
// The library exports no getPluginCreators/setLoggerFinder, so IPluginRegistry::loadLibrary
// (trt.get_plugin_registry().load_library) is not the way to load it: the static registration
// below would already have registered the creators, and loadLibrary refuses duplicates.
#include "../attention/attention_plugin.h"
#include "../rmsnorm/rmsnorm_plugin.h"
#include "../vision_attention/vision_attention_plugin.h"
#include "../weight_only_gemm/quantized_gather_plugin.h"
#include "../weight_only_gemm/weight_only_gemm_plugin.h"

QWEN3VL_LEGACY_PLUGIN_API_BEGIN

// REGISTER_TENSORRT_PLUGIN pastes its argument into a variable name: unqualified names only.
using qwen3vl::plugin::AttentionPluginCreator;
using qwen3vl::plugin::QuantizedGatherPluginCreator;
using qwen3vl::plugin::RMSNormPluginCreator;
using qwen3vl::plugin::VisionAttentionPluginCreator;
using qwen3vl::plugin::WeightOnlyGemmPluginCreator;

REGISTER_TENSORRT_PLUGIN(RMSNormPluginCreator);
REGISTER_TENSORRT_PLUGIN(WeightOnlyGemmPluginCreator);
REGISTER_TENSORRT_PLUGIN(QuantizedGatherPluginCreator);
REGISTER_TENSORRT_PLUGIN(AttentionPluginCreator);
REGISTER_TENSORRT_PLUGIN(VisionAttentionPluginCreator);

QWEN3VL_LEGACY_PLUGIN_API_END
