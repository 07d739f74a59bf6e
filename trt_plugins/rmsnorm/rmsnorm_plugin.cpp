// TensorRT plugin `Qwen3VLRMSNorm`: the node graph_passes/trt_rmsnorm.py emits.
//   has_skip=0:             (X, gamma)       -> Y
//   has_skip=1, emit_sum=0: (X, skip, gamma) -> Y
//   has_skip=1, emit_sum=1: (X, skip, gamma) -> Y, X + skip
// The output count comes from the attributes: the ONNX parser asks for it before it sees inputs.
#include "rmsnorm_plugin.h"

#include "rmsnorm_kernel.h"

#include <cmath>
#include <new>

QWEN3VL_LEGACY_PLUGIN_API_BEGIN

namespace qwen3vl
{
namespace plugin
{
namespace
{

int32_t const kSerialFormat = 1; // bumped when the serialized fields change

} // namespace

RMSNormPlugin::RMSNormPlugin(float epsilon, bool hasSkip, bool emitSum) noexcept
    : mEpsilon(epsilon)
    , mHasSkip(hasSkip)
    , mEmitSum(emitSum)
{
}

RMSNormPlugin* RMSNormPlugin::deserialize(void const* data, size_t length) noexcept
{
    Reader reader(data, length);
    int32_t const format = reader.read<int32_t>();
    float const epsilon = reader.read<float>();
    int32_t const hasSkip = reader.read<int32_t>();
    int32_t const emitSum = reader.read<int32_t>();
    if (!reader.complete() || format != kSerialFormat || (emitSum && !hasSkip))
    {
        reportError(kName, "the serialized plugin is corrupt or from another version");
        return nullptr;
    }
    return new (std::nothrow) RMSNormPlugin(epsilon, hasSkip != 0, emitSum != 0);
}

int32_t RMSNormPlugin::getNbOutputs() const noexcept
{
    return mEmitSum ? 2 : 1;
}

size_t RMSNormPlugin::getSerializationSize() const noexcept
{
    return sizeof(int32_t) + sizeof(float) + 2 * sizeof(int32_t);
}

void RMSNormPlugin::serialize(void* buffer) const noexcept
{
    Writer writer(buffer);
    writer.write(kSerialFormat);
    writer.write(mEpsilon);
    writer.write(static_cast<int32_t>(mHasSkip));
    writer.write(static_cast<int32_t>(mEmitSum));
}

nvinfer1::DataType RMSNormPlugin::getOutputDataType(
    int32_t /*index*/, nvinfer1::DataType const* inputTypes, int32_t /*nbInputs*/) const noexcept
{
    return inputTypes[0]; // Y and the sum share X's type
}

nvinfer1::DimsExprs RMSNormPlugin::getOutputDimensions(int32_t /*outputIndex*/, nvinfer1::DimsExprs const* inputs,
    int32_t /*nbInputs*/, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    return inputs[0]; // Y and the sum have X's shape
}

bool RMSNormPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::PluginTensorDesc const* inOut, int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept
{
    nvinfer1::PluginTensorDesc const& desc = inOut[pos];
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        return desc.type == nvinfer1::DataType::kFLOAT || desc.type == nvinfer1::DataType::kHALF;
    }
    return desc.type == inOut[0].type; // one storage type for every input and output
}

void RMSNormPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != this->nbInputs() || nbOutputs != getNbOutputs())
    {
        reportError(kName, mHasSkip ? "expects inputs (X, skip, gamma)" : "expects inputs (X, gamma)");
        return;
    }
    nvinfer1::Dims const& x = in[0].desc.dims;
    nvinfer1::Dims const& gamma = in[nbInputs - 1].desc.dims;
    if (x.nbDims < 1 || gamma.nbDims != 1 || (x.d[x.nbDims - 1] >= 0 && gamma.d[0] >= 0 && x.d[x.nbDims - 1] != gamma.d[0]))
    {
        reportError(kName, "gamma must be (N) with N the last dimension of X");
    }
}

size_t RMSNormPlugin::getWorkspaceSize(nvinfer1::PluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    nvinfer1::PluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t RMSNormPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& x = inputDesc[0].dims;
    int64_t const n = x.nbDims > 0 ? static_cast<int64_t>(x.d[x.nbDims - 1]) : 0;
    int32_t const gammaIndex = nbInputs() - 1;
    if (n <= 0 || n > INT32_MAX || volume(inputDesc[gammaIndex].dims) != n)
    {
        reportError(kName, "gamma must be (N) with N the last dimension of X");
        return 1;
    }
    int64_t const rows = volume(x, 0, x.nbDims - 1);
    qwen3vl_dtype const dtype
        = inputDesc[0].type == nvinfer1::DataType::kHALF ? QWEN3VL_FLOAT16 : QWEN3VL_FLOAT32;
    return launchStatus(qwen3vl_rmsnorm(inputs[0], mHasSkip ? inputs[1] : nullptr, inputs[gammaIndex], outputs[0],
                            mEmitSum ? outputs[1] : nullptr, rows, static_cast<int32_t>(n), mEpsilon, dtype, stream),
        kName);
}

RMSNormPluginCreator::RMSNormPluginCreator()
{
    addField("epsilon", nvinfer1::PluginFieldType::kFLOAT32);
    addField("has_skip", nvinfer1::PluginFieldType::kINT32);
    addField("emit_sum", nvinfer1::PluginFieldType::kINT32);
}

nvinfer1::IPluginV2* RMSNormPluginCreator::createPlugin(
    nvinfer1::AsciiChar const* /*name*/, nvinfer1::PluginFieldCollection const* fc) noexcept
{
    double epsilon = 1e-6;
    double hasSkip = 0;
    double emitSum = 0;
    bool seen[3] = {false, false, false};
    FieldTarget const targets[] = {
        {"epsilon", &epsilon, &seen[0]}, {"has_skip", &hasSkip, &seen[1]}, {"emit_sum", &emitSum, &seen[2]}};
    if (!readFields(kName, fc, targets, 3))
    {
        return nullptr;
    }
    if (!(epsilon >= 0.0) || !std::isfinite(epsilon) || !integerIn(hasSkip, 0, 1) || !integerIn(emitSum, 0, 1)
        || (emitSum == 1 && hasSkip == 0))
    {
        reportError(kName, "attributes: epsilon >= 0, has_skip and emit_sum 0 or 1, emit_sum=1 needs has_skip=1");
        return nullptr;
    }
    auto* plugin = new (std::nothrow) RMSNormPlugin(static_cast<float>(epsilon), hasSkip == 1, emitSum == 1);
    if (plugin != nullptr)
    {
        plugin->setPluginNamespace(mNamespace.c_str());
    }
    return plugin;
}

} // namespace plugin
} // namespace qwen3vl

QWEN3VL_LEGACY_PLUGIN_API_END
