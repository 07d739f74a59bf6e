// The one header that includes TensorRT, and everything that differs between the versions the
// plugins build against: 8.6 (the last release for SM 6.1), 10.x and 11.x.
//
// What differs, and how it is handled:
// - IPluginV2DynamicExt and IPluginCreator are deprecated from 10.0 (IPluginV3 replaces them) but
//   still declared through 11.x, and 8.6 has nothing else: the plugins keep the V2 interface and
//   silence the deprecation locally (QWEN3VL_LEGACY_PLUGIN_API_BEGIN/END).
// - REGISTER_TENSORRT_PLUGIN picks the deprecated IPluginRegistry::registerCreator(IPluginCreator&)
//   overload in 10.x: registrations sit inside the same BEGIN/END.
// - The headers themselves warn under -Wall -Wextra (deprecated enumerators used inline, unused
//   parameters in 8.6/10.x inline bodies), and -Woverloaded-virtual (in -Wall from GCC 13) points
//   at the implicit-batch overloads that IPluginV2DynamicExt finalises and every V2 plugin hides:
//   the includes below are wrapped so that -Werror holds.
// - Dims hold int32 in 8.6 and int64 from 10.0; IExprBuilder::constant takes the same type:
//   DimValue and constantDim().
// - DataType::kINT64 and PluginFieldType::kINT64 exist from 10.0 (8.6's ONNX parser narrows int64
//   tensors to int32). The TensorRT graphs cast every index a plugin reads to int32, so the plugins
//   take INT32 in every version; only attribute parsing meets kINT64 (plugin_utils.h).
// - IPluginV2Ext::isOutputBroadcastAcrossBatch/canBroadcastInputAcrossBatch are gone in 11.x; they
//   are final in IPluginV2DynamicExt in 8.6 and 10.x, so the plugins never mention them.
// - Every virtual is noexcept in all of these versions (since 8.0) and AsciiChar is char in all of
//   them: nothing to adapt.
#pragma once

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Woverloaded-virtual"
#elif defined(_MSC_VER)
#pragma warning(push)
#pragma warning(disable : 4100 4996)
#endif
#include <NvInferRuntime.h>
#include <NvInferVersion.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#elif defined(_MSC_VER)
#pragma warning(pop)
#endif

#include <cstdint>
#include <type_traits>

#if NV_TENSORRT_MAJOR < 8 || (NV_TENSORRT_MAJOR == 8 && NV_TENSORRT_MINOR < 6)
#error "the Qwen3-VL plugins need TensorRT 8.6 or newer"
#endif

// Around code that names the V2 plugin interfaces (see -Woverloaded-virtual above).
#if defined(__GNUC__)
#define QWEN3VL_LEGACY_PLUGIN_API_BEGIN                                                                                \
    _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wdeprecated-declarations\"")                    \
        _Pragma("GCC diagnostic ignored \"-Woverloaded-virtual\"")
#define QWEN3VL_LEGACY_PLUGIN_API_END _Pragma("GCC diagnostic pop")
#elif defined(_MSC_VER)
#define QWEN3VL_LEGACY_PLUGIN_API_BEGIN __pragma(warning(push)) __pragma(warning(disable : 4996))
#define QWEN3VL_LEGACY_PLUGIN_API_END __pragma(warning(pop))
#else
#define QWEN3VL_LEGACY_PLUGIN_API_BEGIN
#define QWEN3VL_LEGACY_PLUGIN_API_END
#endif

namespace qwen3vl
{
namespace trt
{

constexpr int kMajor = NV_TENSORRT_MAJOR;

// int32_t in 8.6, int64_t from 10.0.
using DimValue = std::remove_all_extents_t<decltype(nvinfer1::Dims::d)>;

inline nvinfer1::IDimensionExpr const* constantDim(nvinfer1::IExprBuilder& builder, int64_t value) noexcept
{
    return builder.constant(static_cast<DimValue>(value));
}

} // namespace trt
} // namespace qwen3vl
