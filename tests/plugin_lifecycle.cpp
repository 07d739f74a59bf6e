// Drives each plugin creator and plugin through what TensorRT does with them outside enqueue: create
// from attributes, name/version/namespace, clone, serialize, deserialize (and reject truncated
// bytes), destroy. Built and run by tests/test_kernels_compile.py against each TensorRT header set,
// linked with the kernels: a method left undefined fails the link, a wrong one fails here.
#include "attention/attention_plugin.h"
#include "rmsnorm/rmsnorm_plugin.h"
#include "vision_attention/vision_attention_plugin.h"
#include "weight_only_gemm/quantized_gather_plugin.h"
#include "weight_only_gemm/weight_only_gemm_plugin.h"

#include <cstdio>
#include <cstring>
#include <vector>

QWEN3VL_LEGACY_PLUGIN_API_BEGIN

namespace
{

using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

struct Attributes
{
    std::vector<int32_t> ints;
    std::vector<float> floats;
    std::vector<PluginField> fields;

    Attributes(std::vector<char const*> intNames, std::vector<int32_t> intValues, std::vector<char const*> floatNames,
        std::vector<float> floatValues)
        : ints(intValues)
        , floats(floatValues)
    {
        for (size_t i = 0; i < intNames.size(); ++i)
        {
            fields.emplace_back(intNames[i], &ints[i], PluginFieldType::kINT32, 1);
        }
        for (size_t i = 0; i < floatNames.size(); ++i)
        {
            fields.emplace_back(floatNames[i], &floats[i], PluginFieldType::kFLOAT32, 1);
        }
    }
};

std::vector<char> bytesOf(nvinfer1::IPluginV2 const& plugin)
{
    std::vector<char> bytes(plugin.getSerializationSize());
    plugin.serialize(bytes.data());
    return bytes;
}

int failures = 0;

void expect(bool ok, char const* plugin, char const* what)
{
    if (!ok)
    {
        std::printf("%s: %s\n", plugin, what);
        ++failures;
    }
}

template <typename Creator>
void check(char const* name, std::vector<PluginField> const& fields)
{
    Creator creator;
    creator.setPluginNamespace("creator_ns");
    expect(std::strcmp(creator.getPluginName(), name) == 0, name, "creator name");
    expect(std::strcmp(creator.getPluginVersion(), "1") == 0, name, "creator version");
    nvinfer1::PluginFieldCollection collection{static_cast<int32_t>(fields.size()), fields.data()};
    auto* plugin = static_cast<nvinfer1::IPluginV2DynamicExt*>(creator.createPlugin("node", &collection));
    expect(plugin != nullptr, name, "createPlugin refused valid attributes");
    if (plugin == nullptr)
    {
        return;
    }
    plugin->setPluginNamespace("plugin_ns");
    expect(std::strcmp(plugin->getPluginType(), name) == 0, name, "plugin type");
    expect(std::strcmp(plugin->getPluginVersion(), "1") == 0, name, "plugin version");
    expect(std::strcmp(plugin->getPluginNamespace(), "plugin_ns") == 0, name, "plugin namespace");
    expect(plugin->initialize() == 0, name, "initialize");
    std::vector<char> const bytes = bytesOf(*plugin);

    nvinfer1::IPluginV2DynamicExt* copy = plugin->clone();
    expect(copy != nullptr && bytesOf(*copy) == bytes, name, "clone differs");
    expect(copy != nullptr && std::strcmp(copy->getPluginNamespace(), "plugin_ns") == 0, name, "clone namespace");

    nvinfer1::IPluginV2* restored = creator.deserializePlugin("node", bytes.data(), bytes.size());
    expect(restored != nullptr && bytesOf(*restored) == bytes, name, "deserialized plugin differs");
    expect(restored != nullptr && std::strcmp(restored->getPluginNamespace(), "creator_ns") == 0, name,
        "deserialized plugin lacks the creator's namespace");
    expect(creator.deserializePlugin("node", bytes.data(), bytes.size() - 1) == nullptr, name,
        "truncated bytes accepted");

    for (nvinfer1::IPluginV2* p : {static_cast<nvinfer1::IPluginV2*>(copy), restored})
    {
        if (p != nullptr)
        {
            p->destroy();
        }
    }
    plugin->terminate();
    plugin->destroy();
}

} // namespace

int main()
{
    using namespace qwen3vl::plugin;
    char const cacheType[] = "fp16";
    Attributes attention({"num_heads", "kv_num_heads", "head_dim"}, {16, 8, 128}, {"scale", "epsilon"},
        {0.088f, 1e-6f});
    attention.fields.emplace_back("kv_cache_type", cacheType, PluginFieldType::kCHAR, 4);
    check<AttentionPluginCreator>("Qwen3VLAttention", attention.fields);
    check<RMSNormPluginCreator>("Qwen3VLRMSNorm",
        Attributes({"has_skip", "emit_sum"}, {1, 1}, {"epsilon"}, {1e-6f}).fields);
    check<VisionAttentionPluginCreator>("Qwen3VLVisionAttention",
        Attributes({"num_heads", "head_dim"}, {16, 64}, {"scale"}, {0.125f}).fields);
    check<QuantizedGatherPluginCreator>("Qwen3VLQuantizedGather",
        Attributes({"bits", "block_size", "has_zero_points"}, {4, 64, 1}, {}, {}).fields);
    check<WeightOnlyGemmPluginCreator>("Qwen3VLWeightOnlyGemm",
        Attributes({"K", "N", "bits", "block_size", "accuracy_level", "has_zero_points", "has_bias"},
            {2048, 6144, 4, 64, 4, 0, 1}, {}, {})
            .fields);
    std::printf("%s\n", failures ? "FAILED" : "all plugins ok");
    return failures ? 1 : 0;
}

QWEN3VL_LEGACY_PLUGIN_API_END
