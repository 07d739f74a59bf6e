// TensorRT plugin `Qwen3VLQuantizedGather`: the quantized token embedding, the node
// graph_passes/trt_weight_gemm.py emits from GatherBlockQuantized (gather_axis 0, quantize_axis 1).
//   (data, indices, scales[, zero_points if has_zero_points]) -> Y (*indices.shape, k_blocks * block_size)
// data int32 (V, k_blocks, blob / 4) and zero points int32 (ceil(V * zp_row / 4)) are words over
// the uint8 bytes of GatherBlockQuantized's layout (TensorRT 8.6 offers a plugin FLOAT, HALF and
// INT32 only); data is the same initializer as the tied lm_head's weight. Indices int32.
#include "quantized_gather_plugin.h"

#include "weight_only_gemm_kernel.h"

#include <new>

QWEN3VL_LEGACY_PLUGIN_API_BEGIN

namespace qwen3vl
{
namespace plugin
{
namespace
{

int32_t const kSerialFormat = 1;

bool validAttributes(int32_t bits, int32_t blockSize)
{
    return (bits == 4 || bits == 8) && blockSize >= 16 && (blockSize & (blockSize - 1)) == 0;
}

} // namespace

QuantizedGatherPlugin::QuantizedGatherPlugin(int32_t bits, int32_t blockSize, bool hasZeroPoints) noexcept
    : mBits(bits)
    , mBlockSize(blockSize)
    , mHasZeroPoints(hasZeroPoints)
{
}

QuantizedGatherPlugin* QuantizedGatherPlugin::deserialize(void const* data, size_t length) noexcept
{
    Reader reader(data, length);
    int32_t const format = reader.read<int32_t>();
    int32_t const bits = reader.read<int32_t>();
    int32_t const blockSize = reader.read<int32_t>();
    int32_t const hasZeroPoints = reader.read<int32_t>();
    if (!reader.complete() || format != kSerialFormat || !validAttributes(bits, blockSize))
    {
        reportError(kName, "the serialized plugin is corrupt or from another version");
        return nullptr;
    }
    return new (std::nothrow) QuantizedGatherPlugin(bits, blockSize, hasZeroPoints != 0);
}

int32_t QuantizedGatherPlugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t QuantizedGatherPlugin::getSerializationSize() const noexcept
{
    return 4 * sizeof(int32_t);
}

void QuantizedGatherPlugin::serialize(void* buffer) const noexcept
{
    Writer writer(buffer);
    writer.write(kSerialFormat);
    writer.write(mBits);
    writer.write(mBlockSize);
    writer.write(static_cast<int32_t>(mHasZeroPoints));
}

nvinfer1::DataType QuantizedGatherPlugin::getOutputDataType(
    int32_t /*index*/, nvinfer1::DataType const* inputTypes, int32_t /*nbInputs*/) const noexcept
{
    return inputTypes[2]; // Y has the scales' type
}

nvinfer1::DimsExprs QuantizedGatherPlugin::getOutputDimensions(int32_t /*outputIndex*/,
    nvinfer1::DimsExprs const* inputs, int32_t /*nbInputs*/, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    // indices' shape, then the padded row width k_blocks * block_size (k_blocks = scales' dim 1).
    nvinfer1::DimsExprs out = inputs[1];
    if (out.nbDims >= nvinfer1::Dims::MAX_DIMS || inputs[2].nbDims != 2)
    {
        reportError(kName, "indices of rank < 8 and scales (rows, k_blocks) expected");
        return out;
    }
    out.d[out.nbDims] = exprBuilder.operation(
        nvinfer1::DimensionOperation::kPROD, *inputs[2].d[1], *trt::constantDim(exprBuilder, mBlockSize));
    out.nbDims += 1;
    return out;
}

bool QuantizedGatherPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::PluginTensorDesc const* inOut, int32_t nbInputs, int32_t /*nbOutputs*/) noexcept
{
    nvinfer1::PluginTensorDesc const& desc = inOut[pos];
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return desc.type == nvinfer1::DataType::kINT32; // words over the packed bytes
    case 1: return desc.type == nvinfer1::DataType::kINT32; // the graph casts its indices to int32
    case 2: return desc.type == nvinfer1::DataType::kFLOAT || desc.type == nvinfer1::DataType::kHALF;
    default: break;
    }
    if (mHasZeroPoints && pos == 3 && pos < nbInputs)
    {
        return desc.type == nvinfer1::DataType::kINT32;
    }
    return desc.type == inOut[2].type; // Y
}

void QuantizedGatherPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != this->nbInputs() || nbOutputs != 1)
    {
        reportError(kName, "the inputs do not match has_zero_points");
        return;
    }
    nvinfer1::Dims const& data = in[0].desc.dims;
    nvinfer1::Dims const& scales = in[2].desc.dims;
    if (data.nbDims != 3 || scales.nbDims != 2 || (data.d[1] >= 0 && scales.d[1] >= 0 && data.d[1] != scales.d[1])
        || (data.d[2] >= 0 && static_cast<int64_t>(data.d[2]) * 32 != static_cast<int64_t>(mBlockSize) * mBits))
    {
        reportError(kName, "data int32 (rows, k_blocks, block_size * bits / 32) and scales (rows, k_blocks) expected");
    }
    if (mHasZeroPoints && in[3].desc.dims.nbDims != 1)
    {
        reportError(kName, "zero points int32 (ceil(rows * zp_row / 4)) expected");
    }
}

size_t QuantizedGatherPlugin::getWorkspaceSize(nvinfer1::PluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    nvinfer1::PluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t QuantizedGatherPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& data = inputDesc[0].dims;
    nvinfer1::Dims const& scales = inputDesc[2].dims;
    int64_t const rows = data.nbDims == 3 ? static_cast<int64_t>(data.d[0]) : 0;
    int64_t const zeroPointWords = (rows * ((static_cast<int64_t>(scales.d[1]) * mBits + 7) / 8) + 3) / 4;
    if (data.nbDims != 3 || scales.nbDims != 2 || data.d[1] != scales.d[1] || scales.d[0] != data.d[0]
        || static_cast<int64_t>(data.d[2]) * 32 != static_cast<int64_t>(mBlockSize) * mBits
        || (mHasZeroPoints && volume(inputDesc[3].dims) != zeroPointWords))
    {
        reportError(kName, "data int32 (rows, k_blocks, block_size * bits / 32), scales (rows, k_blocks) and zero "
                           "points int32 (ceil(rows * zp_row / 4)) expected");
        return 1;
    }
    // int32 words -> the bytes they hold (little-endian, as the graph wrote them): pointer casts.
    uint8_t const* zeroPoints = mHasZeroPoints ? static_cast<uint8_t const*>(inputs[3]) : nullptr;
    qwen3vl_dtype const dtype = inputDesc[2].type == nvinfer1::DataType::kHALF ? QWEN3VL_FLOAT16 : QWEN3VL_FLOAT32;
    return launchStatus(qwen3vl_quantized_gather(static_cast<uint8_t const*>(inputs[0]), inputs[1], 32,
                            volume(inputDesc[1].dims), inputs[2], zeroPoints,
                            outputs[0], static_cast<int64_t>(data.d[0]), static_cast<int32_t>(scales.d[1]), mBits,
                            mBlockSize, dtype, stream),
        kName);
}

QuantizedGatherPluginCreator::QuantizedGatherPluginCreator()
{
    addField("bits", nvinfer1::PluginFieldType::kINT32);
    addField("block_size", nvinfer1::PluginFieldType::kINT32);
    addField("has_zero_points", nvinfer1::PluginFieldType::kINT32);
}

nvinfer1::IPluginV2* QuantizedGatherPluginCreator::createPlugin(
    nvinfer1::AsciiChar const* /*name*/, nvinfer1::PluginFieldCollection const* fc) noexcept
{
    double bits = 4;
    double blockSize = 0;
    double hasZeroPoints = 0;
    bool seen[3] = {};
    FieldTarget const targets[]
        = {{"bits", &bits, &seen[0]}, {"block_size", &blockSize, &seen[1]}, {"has_zero_points", &hasZeroPoints, &seen[2]}};
    if (!readFields(kName, fc, targets, 3))
    {
        return nullptr;
    }
    if (!seen[1] || !integerIn(bits, 4, 8) || !integerIn(blockSize, 16, 1 << 30) || !integerIn(hasZeroPoints, 0, 1)
        || !validAttributes(static_cast<int32_t>(bits), static_cast<int32_t>(blockSize)))
    {
        reportError(kName, "attributes: bits 4 or 8, block_size (required) a power of two >= 16, has_zero_points 0 or 1");
        return nullptr;
    }
    auto* plugin = new (std::nothrow)
        QuantizedGatherPlugin(static_cast<int32_t>(bits), static_cast<int32_t>(blockSize), hasZeroPoints == 1);
    if (plugin != nullptr)
    {
        plugin->setPluginNamespace(mNamespace.c_str());
    }
    return plugin;
}

} // namespace plugin
} // namespace qwen3vl

QWEN3VL_LEGACY_PLUGIN_API_END
