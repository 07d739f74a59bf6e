// TensorRT plugin `Qwen3VLWeightOnlyGemm`: the node graph_passes/trt_weight_gemm.py emits from
// MatMulNBits, reading its packed weights as they are.
//   (A, B, scales[, zero_points if has_zero_points][, bias if has_bias]) -> Y
// B and the zero points arrive as int32 words over MatMulNBits' uint8 bytes (TensorRT 8.6 offers a
// plugin FLOAT, HALF and INT32 only; the parser would widen a uint8 initializer byte by byte): B
// (N, k_blocks, blob / 4), zero points flat (ceil(N * zp_row / 4)). The kernel reads the bytes
// through a pointer cast; nothing is converted.
#include "weight_only_gemm_plugin.h"

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
size_t const kWorkspaceAlignment = 256; // what the kernel asks of its workspace

bool validAttributes(WeightOnlyGemmPlugin::Attributes const& a)
{
    bool const powerOfTwo = a.blockSize >= 16 && (a.blockSize & (a.blockSize - 1)) == 0;
    return a.k > 0 && a.n > 0 && (a.bits == 4 || a.bits == 8) && powerOfTwo && a.accuracyLevel >= 0
        && a.accuracyLevel <= 4;
}

int64_t kBlocksOf(WeightOnlyGemmPlugin::Attributes const& a)
{
    return (static_cast<int64_t>(a.k) + a.blockSize - 1) / a.blockSize;
}

// int32 words of one packed block (blob / 4; blob = block_size * bits / 8 is a multiple of 8).
int64_t blockWordsOf(WeightOnlyGemmPlugin::Attributes const& a)
{
    return static_cast<int64_t>(a.blockSize) * a.bits / 32;
}

// int32 words of the flat zero points: N rows of ceil(k_blocks * bits / 8) bytes, padded to a word.
int64_t zeroPointWordsOf(WeightOnlyGemmPlugin::Attributes const& a)
{
    return (static_cast<int64_t>(a.n) * ((kBlocksOf(a) * a.bits + 7) / 8) + 3) / 4;
}

// A known dimension that differs from the expected value (-1: unknown at build time).
bool conflicts(int64_t dim, int64_t expected)
{
    return dim >= 0 && dim != expected;
}

} // namespace

WeightOnlyGemmPlugin::WeightOnlyGemmPlugin(Attributes const& attributes) noexcept
    : mAttributes(attributes)
{
}

WeightOnlyGemmPlugin* WeightOnlyGemmPlugin::deserialize(void const* data, size_t length) noexcept
{
    Reader reader(data, length);
    int32_t const format = reader.read<int32_t>();
    Attributes a{};
    a.k = reader.read<int32_t>();
    a.n = reader.read<int32_t>();
    a.bits = reader.read<int32_t>();
    a.blockSize = reader.read<int32_t>();
    a.accuracyLevel = reader.read<int32_t>();
    a.hasZeroPoints = reader.read<int32_t>() != 0;
    a.hasBias = reader.read<int32_t>() != 0;
    if (!reader.complete() || format != kSerialFormat || !validAttributes(a))
    {
        reportError(kName, "the serialized plugin is corrupt or from another version");
        return nullptr;
    }
    return new (std::nothrow) WeightOnlyGemmPlugin(a);
}

int32_t WeightOnlyGemmPlugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t WeightOnlyGemmPlugin::getSerializationSize() const noexcept
{
    return 8 * sizeof(int32_t);
}

void WeightOnlyGemmPlugin::serialize(void* buffer) const noexcept
{
    Writer writer(buffer);
    writer.write(kSerialFormat);
    writer.write(mAttributes.k);
    writer.write(mAttributes.n);
    writer.write(mAttributes.bits);
    writer.write(mAttributes.blockSize);
    writer.write(mAttributes.accuracyLevel);
    writer.write(static_cast<int32_t>(mAttributes.hasZeroPoints));
    writer.write(static_cast<int32_t>(mAttributes.hasBias));
}

nvinfer1::DataType WeightOnlyGemmPlugin::getOutputDataType(
    int32_t /*index*/, nvinfer1::DataType const* inputTypes, int32_t /*nbInputs*/) const noexcept
{
    return inputTypes[0]; // Y has A's type
}

nvinfer1::DimsExprs WeightOnlyGemmPlugin::getOutputDimensions(int32_t /*outputIndex*/,
    nvinfer1::DimsExprs const* inputs, int32_t /*nbInputs*/, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    nvinfer1::DimsExprs out = inputs[0]; // (..., K) -> (..., N)
    if (out.nbDims > 0)
    {
        out.d[out.nbDims - 1] = trt::constantDim(exprBuilder, mAttributes.n);
    }
    return out;
}

bool WeightOnlyGemmPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::PluginTensorDesc const* inOut, int32_t nbInputs, int32_t /*nbOutputs*/) noexcept
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
    bool const isZeroPoints = mAttributes.hasZeroPoints && pos == 3;
    if (pos == 1 || (isZeroPoints && pos < nbInputs))
    {
        return desc.type == nvinfer1::DataType::kINT32; // words over the packed bytes
    }
    return desc.type == inOut[0].type; // scales, bias and Y share A's type
}

void WeightOnlyGemmPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != this->nbInputs() || nbOutputs != 1)
    {
        reportError(kName, "the inputs do not match has_zero_points/has_bias");
        return;
    }
    int64_t const kBlocks = kBlocksOf(mAttributes);
    nvinfer1::Dims const& a = in[0].desc.dims;
    nvinfer1::Dims const& b = in[1].desc.dims;
    nvinfer1::Dims const& scales = in[2].desc.dims;
    bool bad = a.nbDims < 1 || conflicts(a.d[a.nbDims - 1], mAttributes.k);
    bad = bad || b.nbDims != 3 || conflicts(b.d[0], mAttributes.n) || conflicts(b.d[1], kBlocks)
        || conflicts(b.d[2], blockWordsOf(mAttributes));
    bad = bad || scales.nbDims != 2 || conflicts(scales.d[0], mAttributes.n) || conflicts(scales.d[1], kBlocks);
    if (mAttributes.hasZeroPoints)
    {
        nvinfer1::Dims const& zp = in[3].desc.dims;
        bad = bad || zp.nbDims != 1 || conflicts(zp.d[0], zeroPointWordsOf(mAttributes));
    }
    if (mAttributes.hasBias)
    {
        nvinfer1::Dims const& bias = in[nbInputs - 1].desc.dims;
        bad = bad || bias.nbDims != 1 || conflicts(bias.d[0], mAttributes.n);
    }
    if (bad)
    {
        reportError(kName, "input shapes do not match K, N, bits and block_size: B int32 (N, k_blocks, blob / 4), "
                           "scales (N, k_blocks), zero points int32 (ceil(N * zp_row / 4))");
    }
}

int32_t WeightOnlyGemmPlugin::flags() const noexcept
{
    // accuracy_level 4 allows int8 activations; the kernel takes that path on SM 6.1 only.
    return mAttributes.accuracyLevel >= 4 ? QWEN3VL_GEMM_INT8_ACTIVATIONS : 0;
}

size_t WeightOnlyGemmPlugin::getWorkspaceSize(nvinfer1::PluginTensorDesc const* inputs, int32_t /*nbInputs*/,
    nvinfer1::PluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // Called with the largest shapes of the profile: enough for every smaller M.
    int64_t const m = volume(inputs[0].dims) / mAttributes.k;
    size_t const bytes = qwen3vl_weight_only_gemm_workspace_size(m, mAttributes.k, mAttributes.blockSize, flags());
    return bytes == 0 ? 0 : bytes + kWorkspaceAlignment;
}

int32_t WeightOnlyGemmPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& a = inputDesc[0].dims;
    int64_t const kBlocks = kBlocksOf(mAttributes);
    bool const zeroPointsOk
        = !mAttributes.hasZeroPoints || volume(inputDesc[3].dims) == zeroPointWordsOf(mAttributes);
    if (a.nbDims < 1 || a.d[a.nbDims - 1] != mAttributes.k
        || volume(inputDesc[1].dims) != mAttributes.n * kBlocks * blockWordsOf(mAttributes)
        || volume(inputDesc[2].dims) != mAttributes.n * kBlocks || !zeroPointsOk)
    {
        reportError(kName, "input shapes do not match K, N, bits and block_size (MatMulNBits' layout)");
        return 1;
    }
    int64_t const m = volume(a, 0, a.nbDims - 1);
    int32_t const flags = this->flags();
    // Align the workspace for the kernel; getWorkspaceSize asked for the slack.
    size_t const needed = qwen3vl_weight_only_gemm_workspace_size(m, mAttributes.k, mAttributes.blockSize, flags);
    void* aligned = nullptr;
    if (needed > 0 && workspace != nullptr)
    {
        uintptr_t const address = reinterpret_cast<uintptr_t>(workspace);
        aligned = reinterpret_cast<void*>((address + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment);
    }
    // int32 words -> the bytes they hold (little-endian, as the graph wrote them): a pointer cast.
    uint8_t const* zeroPoints = mAttributes.hasZeroPoints ? static_cast<uint8_t const*>(inputs[3]) : nullptr;
    void const* bias = mAttributes.hasBias ? inputs[nbInputs() - 1] : nullptr;
    qwen3vl_dtype const dtype = inputDesc[0].type == nvinfer1::DataType::kHALF ? QWEN3VL_FLOAT16 : QWEN3VL_FLOAT32;
    return launchStatus(qwen3vl_weight_only_gemm(inputs[0], static_cast<uint8_t const*>(inputs[1]), inputs[2],
                            zeroPoints, bias, outputs[0], m, mAttributes.n, mAttributes.k, mAttributes.bits,
                            mAttributes.blockSize, dtype, flags, aligned, needed, stream),
        kName);
}

WeightOnlyGemmPluginCreator::WeightOnlyGemmPluginCreator()
{
    for (char const* name : {"K", "N", "bits", "block_size", "accuracy_level", "has_zero_points", "has_bias"})
    {
        addField(name, nvinfer1::PluginFieldType::kINT32);
    }
}

nvinfer1::IPluginV2* WeightOnlyGemmPluginCreator::createPlugin(
    nvinfer1::AsciiChar const* /*name*/, nvinfer1::PluginFieldCollection const* fc) noexcept
{
    double k = 0;
    double n = 0;
    double bits = 4;
    double blockSize = 0;
    double accuracyLevel = 0;
    double hasZeroPoints = 0;
    double hasBias = 0;
    bool seen[7] = {};
    FieldTarget const targets[] = {{"K", &k, &seen[0]}, {"N", &n, &seen[1]}, {"bits", &bits, &seen[2]},
        {"block_size", &blockSize, &seen[3]}, {"accuracy_level", &accuracyLevel, &seen[4]},
        {"has_zero_points", &hasZeroPoints, &seen[5]}, {"has_bias", &hasBias, &seen[6]}};
    if (!readFields(kName, fc, targets, 7))
    {
        return nullptr;
    }
    if (!seen[0] || !seen[1] || !seen[3])
    {
        reportError(kName, "attributes K, N and block_size are required");
        return nullptr;
    }
    int32_t const big = 1 << 30;
    if (!integerIn(k, 1, big) || !integerIn(n, 1, big) || !integerIn(bits, 4, 8) || !integerIn(blockSize, 16, big)
        || !integerIn(accuracyLevel, 0, 4) || !integerIn(hasZeroPoints, 0, 1) || !integerIn(hasBias, 0, 1))
    {
        reportError(kName, "attributes out of range");
        return nullptr;
    }
    WeightOnlyGemmPlugin::Attributes const attributes{static_cast<int32_t>(k), static_cast<int32_t>(n),
        static_cast<int32_t>(bits), static_cast<int32_t>(blockSize), static_cast<int32_t>(accuracyLevel),
        hasZeroPoints == 1, hasBias == 1};
    if (!validAttributes(attributes))
    {
        reportError(kName, "bits must be 4 or 8 and block_size a power of two >= 16");
        return nullptr;
    }
    auto* plugin = new (std::nothrow) WeightOnlyGemmPlugin(attributes);
    if (plugin != nullptr)
    {
        plugin->setPluginNamespace(mNamespace.c_str());
    }
    return plugin;
}

} // namespace plugin
} // namespace qwen3vl

QWEN3VL_LEGACY_PLUGIN_API_END
