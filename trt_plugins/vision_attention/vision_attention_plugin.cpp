// TensorRT plugin `Qwen3VLVisionAttention`: the node graph_passes/trt_vision_attention.py emits.
//   (q, k, v, frame_patch_index, patch_frame_slot) -> output
// The index tensors are int32 (the graph casts them; TensorRT 8.6 offers a plugin FLOAT, HALF and
// INT32 only). There is no mask input (no bool plugin input in 8.6): the graph marks padding slots
// with index -1, and the kernel, given no mask, counts every index outside [0, N) as padding (the
// builder's timing runs feed arbitrary data, so that check is needed anyway). The kernel writes
// each frame slot's result to the row frame_patch_index names, so patch_frame_slot (its inverse,
// from the same frame_layout) is accepted but not read.
#include "vision_attention_plugin.h"

#include "vision_attention_kernel.h"

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

enum Input : int32_t
{
    kQ = 0,
    kK,
    kV,
    kFramePatchIndex,
    kPatchFrameSlot,
    kNbInputs
};

bool dimIs(nvinfer1::Dims const& dims, int32_t index, int64_t want) noexcept
{
    return index < dims.nbDims && (dims.d[index] < 0 || dims.d[index] == want);
}

} // namespace

VisionAttentionPlugin::VisionAttentionPlugin(int32_t numHeads, int32_t headDim, float scale) noexcept
    : mNumHeads(numHeads)
    , mHeadDim(headDim)
    , mScale(scale)
{
}

VisionAttentionPlugin* VisionAttentionPlugin::deserialize(void const* data, size_t length) noexcept
{
    Reader reader(data, length);
    int32_t const format = reader.read<int32_t>();
    int32_t const numHeads = reader.read<int32_t>();
    int32_t const headDim = reader.read<int32_t>();
    float const scale = reader.read<float>();
    if (!reader.complete() || format != kSerialFormat || numHeads <= 0 || (headDim != 64 && headDim != 128))
    {
        reportError(kName, "the serialized plugin is corrupt or from another version");
        return nullptr;
    }
    return new (std::nothrow) VisionAttentionPlugin(numHeads, headDim, scale);
}

int32_t VisionAttentionPlugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t VisionAttentionPlugin::getSerializationSize() const noexcept
{
    return 3 * sizeof(int32_t) + sizeof(float);
}

void VisionAttentionPlugin::serialize(void* buffer) const noexcept
{
    Writer writer(buffer);
    writer.write(kSerialFormat);
    writer.write(mNumHeads);
    writer.write(mHeadDim);
    writer.write(mScale);
}

nvinfer1::DataType VisionAttentionPlugin::getOutputDataType(
    int32_t /*index*/, nvinfer1::DataType const* inputTypes, int32_t /*nbInputs*/) const noexcept
{
    return inputTypes[kQ];
}

nvinfer1::DimsExprs VisionAttentionPlugin::getOutputDimensions(int32_t /*outputIndex*/,
    nvinfer1::DimsExprs const* inputs, int32_t /*nbInputs*/, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    return inputs[kQ]; // (N, H*D), packed order
}

bool VisionAttentionPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::PluginTensorDesc const* inOut, int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept
{
    using nvinfer1::DataType;
    nvinfer1::PluginTensorDesc const& desc = inOut[pos];
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kQ: return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    case kFramePatchIndex:
    case kPatchFrameSlot: return desc.type == DataType::kINT32;
    default: return desc.type == inOut[kQ].type; // k, v and the output
    }
}

void VisionAttentionPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1)
    {
        reportError(kName, "expects 5 inputs (q, k, v, frame_patch_index, patch_frame_slot) and 1 output");
        return;
    }
    int64_t const width = static_cast<int64_t>(mNumHeads) * mHeadDim;
    nvinfer1::Dims const& index = in[kFramePatchIndex].desc.dims;
    bool ok = true;
    for (int32_t i = kQ; i <= kV; ++i)
    {
        ok = ok && in[i].desc.dims.nbDims == 2 && dimIs(in[i].desc.dims, 1, width);
    }
    ok = ok && index.nbDims == 2 && in[kPatchFrameSlot].desc.dims.nbDims == 1;
    if (!ok)
    {
        reportError(kName, "shapes: q/k/v (N, H*D), frame_patch_index (F, L), patch_frame_slot (N)");
    }
}

size_t VisionAttentionPlugin::getWorkspaceSize(nvinfer1::PluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    nvinfer1::PluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t VisionAttentionPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& index = inputDesc[kFramePatchIndex].dims;
    nvinfer1::Dims const& q = inputDesc[kQ].dims;
    if (index.nbDims != 2 || index.d[0] > INT32_MAX || index.d[1] > INT32_MAX || q.nbDims != 2)
    {
        reportError(kName, "q must be (N, H*D) and frame_patch_index (F, L)");
        return 1;
    }
    qwen3vl_dtype const dtype = inputDesc[kQ].type == nvinfer1::DataType::kHALF ? QWEN3VL_FLOAT16 : QWEN3VL_FLOAT32;
    // No mask: padding slots hold an index outside [0, N) (the graph's -1).
    cudaError_t const status = qwen3vl_vision_attention(inputs[kQ], inputs[kK], inputs[kV],
        inputs[kFramePatchIndex], nullptr, outputs[0], static_cast<int64_t>(q.d[0]), static_cast<int32_t>(index.d[0]),
        static_cast<int32_t>(index.d[1]), mNumHeads, mHeadDim, mScale, dtype, 32, stream);
    return launchStatus(status, kName);
}

VisionAttentionPluginCreator::VisionAttentionPluginCreator()
{
    addField("num_heads", nvinfer1::PluginFieldType::kINT32);
    addField("head_dim", nvinfer1::PluginFieldType::kINT32);
    addField("scale", nvinfer1::PluginFieldType::kFLOAT32);
}

nvinfer1::IPluginV2* VisionAttentionPluginCreator::createPlugin(
    nvinfer1::AsciiChar const* /*name*/, nvinfer1::PluginFieldCollection const* fc) noexcept
{
    double numHeads = 0;
    double headDim = 0;
    double scale = 0;
    bool seen[3] = {false, false, false};
    FieldTarget const targets[]
        = {{"num_heads", &numHeads, &seen[0]}, {"head_dim", &headDim, &seen[1]}, {"scale", &scale, &seen[2]}};
    if (!readFields(kName, fc, targets, 3))
    {
        return nullptr;
    }
    if (!integerIn(numHeads, 1, 65535) || (headDim != 64 && headDim != 128))
    {
        reportError(kName, "attributes: num_heads >= 1, head_dim 64 or 128");
        return nullptr;
    }
    if (!seen[2] || scale == 0)
    {
        scale = 1.0 / std::sqrt(headDim); // the contract's default, D**-0.5
    }
    if (!std::isfinite(scale))
    {
        reportError(kName, "attribute scale must be finite");
        return nullptr;
    }
    auto* plugin = new (std::nothrow)
        VisionAttentionPlugin(static_cast<int32_t>(numHeads), static_cast<int32_t>(headDim), static_cast<float>(scale));
    if (plugin != nullptr)
    {
        plugin->setPluginNamespace(mNamespace.c_str());
    }
    return plugin;
}

} // namespace plugin
} // namespace qwen3vl

QWEN3VL_LEGACY_PLUGIN_API_END
