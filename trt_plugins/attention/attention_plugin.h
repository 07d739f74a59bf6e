// TensorRT plugin `Qwen3VLAttention` (version "1"): contract in trt_plugins/attention/README.md.
#pragma once

#include "../common/kernel_types.h"
#include "../common/plugin_utils.h"

#include <string>

QWEN3VL_LEGACY_PLUGIN_API_BEGIN

namespace qwen3vl
{
namespace plugin
{

class AttentionPlugin final : public PluginBase<AttentionPlugin>
{
public:
    static constexpr char const* kName = "Qwen3VLAttention";
    static constexpr char const* kVersion = "1";

    AttentionPlugin(int32_t numHeads, int32_t kvNumHeads, int32_t headDim, float scale, float epsilon,
        qwen3vl_dtype cacheType) noexcept;

    // nullptr (and a report) when the bytes are not a serialized AttentionPlugin.
    static AttentionPlugin* deserialize(void const* data, size_t length) noexcept;

    // IPluginV2
    int32_t getNbOutputs() const noexcept override;
    size_t getSerializationSize() const noexcept override;
    void serialize(void* buffer) const noexcept override;

    // IPluginV2Ext
    nvinfer1::DataType getOutputDataType(
        int32_t index, nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;

    // IPluginV2DynamicExt
    nvinfer1::DimsExprs getOutputDimensions(int32_t outputIndex, nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(
        int32_t pos, nvinfer1::PluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override;
    void configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::PluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

private:
    nvinfer1::DataType cacheType() const noexcept;

    int32_t mNumHeads;
    int32_t mKvNumHeads;
    int32_t mHeadDim;
    float mScale;
    float mEpsilon;
    qwen3vl_dtype mCacheType;
};

class AttentionPluginCreator final : public PluginCreatorOf<AttentionPlugin>
{
public:
    AttentionPluginCreator();

    nvinfer1::IPluginV2* createPlugin(
        nvinfer1::AsciiChar const* name, nvinfer1::PluginFieldCollection const* fc) noexcept override;
};

} // namespace plugin
} // namespace qwen3vl

QWEN3VL_LEGACY_PLUGIN_API_END
