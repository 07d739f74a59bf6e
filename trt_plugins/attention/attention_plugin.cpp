// TensorRT plugin `Qwen3VLAttention`: the node graph_passes/trt_attention.py emits.
//   (q, k, v, q_norm_weight, k_norm_weight, cos, sin, past_key, past_value, seqlens_k,
//    total_sequence_length) -> (output, present_key, present_value)
// present_key/present_value are the past buffers with this step's keys and values written. The
// runtime binds one buffer per layer to both past_* and present_*: enqueue then sees the same
// address and the kernels write only the new positions. TensorRT 8.6 cannot declare that aliasing,
// so with any other binding (separate memory, e.g. the builder's timing runs) enqueue first copies
// past_* into present_* and then writes in place: correct for every binding, a full-buffer copy per
// call when the buffers are separate.
#include "attention_plugin.h"

#include "attention_kernel.h"

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
    kQNormWeight,
    kKNormWeight,
    kCos,
    kSin,
    kPastKey,
    kPastValue,
    kSeqlensK,
    kTotalSequenceLength,
    kNbInputs
};

enum Output : int32_t
{
    kOutput = 0,
    kPresentKey,
    kPresentValue,
    kNbOutputs
};

// The kv_cache_type attribute. The ONNX parser passes a string attribute as kCHAR bytes of the
// string's length, not necessarily NUL-terminated. Returns false on a value other than fp32/fp16
// (int8 is a future option of the contract, not implemented).
bool readCacheType(nvinfer1::PluginFieldCollection const* fc, qwen3vl_dtype& out) noexcept
{
    if (fc == nullptr)
    {
        return true;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        nvinfer1::PluginField const& field = fc->fields[i];
        if (field.name == nullptr || std::strcmp(field.name, "kv_cache_type") != 0)
        {
            continue;
        }
        if (field.type != nvinfer1::PluginFieldType::kCHAR || field.data == nullptr || field.length < 0)
        {
            return false;
        }
        char const* text = static_cast<char const*>(field.data);
        size_t length = static_cast<size_t>(field.length);
        while (length > 0 && text[length - 1] == '\0')
        {
            --length;
        }
        if (length == 4 && std::strncmp(text, "fp32", 4) == 0)
        {
            out = QWEN3VL_FLOAT32;
        }
        else if (length == 4 && std::strncmp(text, "fp16", 4) == 0)
        {
            out = QWEN3VL_FLOAT16;
        }
        else
        {
            return false;
        }
    }
    return true;
}

bool known(int64_t dim) noexcept
{
    return dim >= 0;
}

// A dimension that is either still unknown (-1 while building) or equal to `want`.
bool dimIs(nvinfer1::Dims const& dims, int32_t index, int64_t want) noexcept
{
    return index < dims.nbDims && (!known(dims.d[index]) || dims.d[index] == want);
}

} // namespace

AttentionPlugin::AttentionPlugin(int32_t numHeads, int32_t kvNumHeads, int32_t headDim, float scale, float epsilon,
    qwen3vl_dtype cacheType) noexcept
    : mNumHeads(numHeads)
    , mKvNumHeads(kvNumHeads)
    , mHeadDim(headDim)
    , mScale(scale)
    , mEpsilon(epsilon)
    , mCacheType(cacheType)
{
}

AttentionPlugin* AttentionPlugin::deserialize(void const* data, size_t length) noexcept
{
    Reader reader(data, length);
    int32_t const format = reader.read<int32_t>();
    int32_t const numHeads = reader.read<int32_t>();
    int32_t const kvNumHeads = reader.read<int32_t>();
    int32_t const headDim = reader.read<int32_t>();
    float const scale = reader.read<float>();
    float const epsilon = reader.read<float>();
    int32_t const cacheType = reader.read<int32_t>();
    if (!reader.complete() || format != kSerialFormat || numHeads <= 0 || kvNumHeads <= 0
        || numHeads % kvNumHeads != 0 || (headDim != 64 && headDim != 128)
        || (cacheType != QWEN3VL_FLOAT32 && cacheType != QWEN3VL_FLOAT16))
    {
        reportError(kName, "the serialized plugin is corrupt or from another version");
        return nullptr;
    }
    return new (std::nothrow)
        AttentionPlugin(numHeads, kvNumHeads, headDim, scale, epsilon, static_cast<qwen3vl_dtype>(cacheType));
}

int32_t AttentionPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

size_t AttentionPlugin::getSerializationSize() const noexcept
{
    return 4 * sizeof(int32_t) + 2 * sizeof(float) + sizeof(int32_t);
}

void AttentionPlugin::serialize(void* buffer) const noexcept
{
    Writer writer(buffer);
    writer.write(kSerialFormat);
    writer.write(mNumHeads);
    writer.write(mKvNumHeads);
    writer.write(mHeadDim);
    writer.write(mScale);
    writer.write(mEpsilon);
    writer.write(static_cast<int32_t>(mCacheType));
}

nvinfer1::DataType AttentionPlugin::cacheType() const noexcept
{
    return mCacheType == QWEN3VL_FLOAT16 ? nvinfer1::DataType::kHALF : nvinfer1::DataType::kFLOAT;
}

nvinfer1::DataType AttentionPlugin::getOutputDataType(
    int32_t index, nvinfer1::DataType const* inputTypes, int32_t /*nbInputs*/) const noexcept
{
    return index == kOutput ? inputTypes[kQ] : cacheType(); // present_* keep the buffers' type
}

nvinfer1::DimsExprs AttentionPlugin::getOutputDimensions(int32_t outputIndex, nvinfer1::DimsExprs const* inputs,
    int32_t /*nbInputs*/, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    switch (outputIndex)
    {
    case kPresentKey: return inputs[kPastKey];
    case kPresentValue: return inputs[kPastValue];
    default: return inputs[kQ]; // (B, S, H*D)
    }
}

bool AttentionPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::PluginTensorDesc const* inOut, int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept
{
    using nvinfer1::DataType;
    nvinfer1::PluginTensorDesc const& desc = inOut[pos];
    // Linear only, and past/present of one type: no reformat copy between the runtime's buffer and
    // the plugin, which would break the in-place update.
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kQ: return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
    case kPastKey:
    case kPastValue:
    case kNbInputs + kPresentKey:
    case kNbInputs + kPresentValue: return desc.type == cacheType();
    case kSeqlensK:
    case kTotalSequenceLength: return desc.type == DataType::kINT32;
    default: return desc.type == inOut[kQ].type; // k, v, weights, cos, sin and the output: T
    }
}

void AttentionPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        reportError(kName, "expects 11 inputs (q, k, v, q_norm_weight, k_norm_weight, cos, sin, past_key, past_value, "
                           "seqlens_k, total_sequence_length) and 3 outputs");
        return;
    }
    int64_t const d = mHeadDim;
    nvinfer1::Dims const& q = in[kQ].desc.dims;
    nvinfer1::Dims const& k = in[kK].desc.dims;
    nvinfer1::Dims const& v = in[kV].desc.dims;
    nvinfer1::Dims const& pastKey = in[kPastKey].desc.dims;
    nvinfer1::Dims const& pastValue = in[kPastValue].desc.dims;
    bool ok = q.nbDims == 3 && k.nbDims == 3 && v.nbDims == 3 && dimIs(q, 2, mNumHeads * d)
        && dimIs(k, 2, mKvNumHeads * d) && dimIs(v, 2, mKvNumHeads * d);
    ok = ok && in[kQNormWeight].desc.dims.nbDims == 1 && dimIs(in[kQNormWeight].desc.dims, 0, d)
        && in[kKNormWeight].desc.dims.nbDims == 1 && dimIs(in[kKNormWeight].desc.dims, 0, d);
    ok = ok && in[kCos].desc.dims.nbDims == 3 && dimIs(in[kCos].desc.dims, 2, d) && in[kSin].desc.dims.nbDims == 3
        && dimIs(in[kSin].desc.dims, 2, d);
    ok = ok && pastKey.nbDims == 4 && pastValue.nbDims == 4 && dimIs(pastKey, 1, mKvNumHeads) && dimIs(pastKey, 3, d)
        && dimIs(pastValue, 1, mKvNumHeads) && dimIs(pastValue, 3, d);
    if (!ok)
    {
        reportError(kName, "shapes: q (B, S, H*D), k/v (B, S, KV*D), norm weights (D), cos/sin (B, S, D), "
                           "past_key/past_value (B, KV, M, D)");
    }
}

size_t AttentionPlugin::getWorkspaceSize(nvinfer1::PluginTensorDesc const* inputs, int32_t /*nbInputs*/,
    nvinfer1::PluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // The decode step's split-K partials at the largest batch; enqueue's batch never exceeds it.
    int64_t const batch = inputs[kQ].dims.nbDims > 0 ? static_cast<int64_t>(inputs[kQ].dims.d[0]) : 0;
    return qwen3vl_attention_workspace_size(static_cast<int32_t>(batch), mNumHeads, mHeadDim);
}

int32_t AttentionPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* workspace, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& q = inputDesc[kQ].dims;
    nvinfer1::Dims const& pastKey = inputDesc[kPastKey].dims;
    if (q.nbDims != 3 || pastKey.nbDims != 4 || q.d[0] > INT32_MAX || q.d[1] > INT32_MAX || pastKey.d[2] > INT32_MAX)
    {
        reportError(kName, "q must be (B, S, H*D) and past_key (B, KV, M, D)");
        return 1;
    }
    int32_t const batch = static_cast<int32_t>(q.d[0]);
    int32_t const seqLen = static_cast<int32_t>(q.d[1]);
    int32_t const capacity = static_cast<int32_t>(pastKey.d[2]);
    qwen3vl_dtype const dtype = inputDesc[kQ].type == nvinfer1::DataType::kHALF ? QWEN3VL_FLOAT16 : QWEN3VL_FLOAT32;
    size_t const workspaceSize = qwen3vl_attention_workspace_size(batch, mNumHeads, mHeadDim);
    // present_* != past_*: the kernel launch copies past into present first (see the file comment).
    return launchStatus(
        qwen3vl_attention(inputs[kQ], inputs[kK], inputs[kV], inputs[kQNormWeight], inputs[kKNormWeight],
            inputs[kCos], inputs[kSin], inputs[kPastKey], inputs[kPastValue],
            static_cast<int32_t const*>(inputs[kSeqlensK]), static_cast<int32_t const*>(inputs[kTotalSequenceLength]),
            outputs[kOutput], outputs[kPresentKey], outputs[kPresentValue], batch, seqLen, mNumHeads, mKvNumHeads,
            mHeadDim, capacity, mScale, mEpsilon, dtype, mCacheType, 0, workspace, workspaceSize, stream),
        kName);
}

AttentionPluginCreator::AttentionPluginCreator()
{
    addField("num_heads", nvinfer1::PluginFieldType::kINT32);
    addField("kv_num_heads", nvinfer1::PluginFieldType::kINT32);
    addField("head_dim", nvinfer1::PluginFieldType::kINT32);
    addField("scale", nvinfer1::PluginFieldType::kFLOAT32);
    addField("epsilon", nvinfer1::PluginFieldType::kFLOAT32);
    addField("kv_cache_type", nvinfer1::PluginFieldType::kCHAR);
}

nvinfer1::IPluginV2* AttentionPluginCreator::createPlugin(
    nvinfer1::AsciiChar const* /*name*/, nvinfer1::PluginFieldCollection const* fc) noexcept
{
    double numHeads = 0;
    double kvNumHeads = 0;
    double headDim = 0;
    double scale = 0;
    double epsilon = 1e-6;
    bool seen[5] = {false, false, false, false, false};
    FieldTarget const targets[] = {{"num_heads", &numHeads, &seen[0]}, {"kv_num_heads", &kvNumHeads, &seen[1]},
        {"head_dim", &headDim, &seen[2]}, {"scale", &scale, &seen[3]}, {"epsilon", &epsilon, &seen[4]}};
    if (!readFields(kName, fc, targets, 5))
    {
        return nullptr;
    }
    qwen3vl_dtype cacheType = QWEN3VL_FLOAT32;
    if (!readCacheType(fc, cacheType))
    {
        reportError(kName, "kv_cache_type must be \"fp32\" or \"fp16\" (int8 is not implemented)");
        return nullptr;
    }
    if (!integerIn(numHeads, 1, 65535) || !integerIn(kvNumHeads, 1, 65535)
        || static_cast<int64_t>(numHeads) % static_cast<int64_t>(kvNumHeads) != 0
        || (headDim != 64 && headDim != 128))
    {
        reportError(kName, "attributes: num_heads a multiple of kv_num_heads, head_dim 64 or 128");
        return nullptr;
    }
    if (!seen[3] || scale == 0)
    {
        scale = 1.0 / std::sqrt(headDim); // the contract's default, D**-0.5
    }
    if (!std::isfinite(scale) || !(epsilon >= 0.0) || !std::isfinite(epsilon))
    {
        reportError(kName, "attributes: scale finite, epsilon >= 0");
        return nullptr;
    }
    auto* plugin = new (std::nothrow) AttentionPlugin(static_cast<int32_t>(numHeads), static_cast<int32_t>(kvNumHeads),
        static_cast<int32_t>(headDim), static_cast<float>(scale), static_cast<float>(epsilon), cacheType);
    if (plugin != nullptr)
    {
        plugin->setPluginNamespace(mNamespace.c_str());
    }
    return plugin;
}

} // namespace plugin
} // namespace qwen3vl

QWEN3VL_LEGACY_PLUGIN_API_END
