// TensorRT plugin `Qwen3VLRMSNorm` (version "1"): contract in trt_plugins/rmsnorm/README.md.
#pragma once

#include "../common/plugin_utils.h"

#include <string>

QWEN3VL_LEGACY_PLUGIN_API_BEGIN

namespace qwen3vl
{
namespace plugin
{

class RMSNormPlugin final : public PluginBase<RMSNormPlugin>
{
public:
    static constexpr char const* kName = "Qwen3VLRMSNorm";
    static constexpr char const* kVersion = "1";

    RMSNormPlugin(float epsilon, bool hasSkip, bool emitSum) noexcept;

    // nullptr (and a report) when the bytes are not a serialized RMSNormPlugin.
    static RMSNormPlugin* deserialize(void const* data, size_t length) noexcept;

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
    int32_t nbInputs() const noexcept
    {
        return mHasSkip ? 3 : 2;
    }

    float mEpsilon;
    bool mHasSkip;
    bool mEmitSum;
};

class RMSNormPluginCreator final : public PluginCreatorOf<RMSNormPlugin>
{
public:
    RMSNormPluginCreator();

    nvinfer1::IPluginV2* createPlugin(
        nvinfer1::AsciiChar const* name, nvinfer1::PluginFieldCollection const* fc) noexcept override;
};

} // namespace plugin
} // namespace qwen3vl

QWEN3VL_LEGACY_PLUGIN_API_END
