// Drives each plugin creator and plugin through what TensorRT does with them outside enqueue. Built
// and run by tests/test_kernels_compile.py against each TensorRT header set, linked with the
// kernels: a method left undefined fails the link, a wrong one fails here. No TensorRT library and
// no GPU: nothing is enqueued.
//
// 1. Fields as TensorRT 8.6's ONNX parser builds them (onnx-tensorrt release/8.6-GA, loadFields in
//    builtin_op_importers.cpp): only the names the creator lists in getFieldNames are passed; INT ->
//    one kINT32, FLOAT -> one kFLOAT32, STRING -> kCHAR bytes *with* the trailing NUL counted in the
//    length, INTS/FLOATS -> arrays. The node attributes below are the ones graph_passes/trt_*.py
//    write (plugin_version and plugin_namespace included, which no creator lists). The plugin so made
//    must serialize like one constructed from the intended values: an attribute the creator does not
//    list, or reads wrongly, shows up here.
// 2. Lifecycle: name, version, namespace, clone, serialize, deserialize (and reject truncated bytes),
//    destroy.
// 3. supportsFormatCombination position by position, as the builder asks: each position offered the
//    types an 8.6 plugin can get (FLOAT, HALF, INT32) in the linear format, earlier positions fixed to
//    the graph's types; the accepted set must be the contract's. INT8, UINT8, BOOL and non-linear
//    formats are refused everywhere; getOutputDataType agrees with the chosen output types.
// 4. getOutputDimensions through a small stand-in of TensorRT's expression builder (constants and
//    + - * / max min over values known here; build-time constant only when both operands are).
#include "attention/attention_plugin.h"
#include "rmsnorm/rmsnorm_plugin.h"
#include "vision_attention/vision_attention_plugin.h"
#include "weight_only_gemm/quantized_gather_plugin.h"
#include "weight_only_gemm/weight_only_gemm_plugin.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <initializer_list>
#include <string>
#include <vector>

QWEN3VL_LEGACY_PLUGIN_API_BEGIN

namespace
{

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

int failures = 0;

void expect(bool ok, std::string const& plugin, std::string const& what)
{
    if (!ok)
    {
        std::printf("%s: %s\n", plugin.c_str(), what.c_str());
        ++failures;
    }
}

// -- 1. ONNX attributes -> plugin fields, as the 8.6 parser does it ----------------------------------

struct Attribute
{
    enum Kind
    {
        kInt,
        kFloat,
        kString,
        kInts,
        kFloats
    };

    std::string name;
    Kind kind;
    std::vector<int32_t> ints;
    std::vector<float> floats;
    std::string text;
};

Attribute intAttr(char const* name, int32_t value)
{
    return {name, Attribute::kInt, {value}, {}, ""};
}

Attribute floatAttr(char const* name, float value)
{
    return {name, Attribute::kFloat, {}, {value}, ""};
}

Attribute stringAttr(char const* name, char const* value)
{
    return {name, Attribute::kString, {}, {}, value};
}

// What the TensorRT passes write besides a plugin's own attributes.
std::vector<Attribute> node(std::vector<Attribute> own)
{
    own.push_back(stringAttr("plugin_version", "1"));
    own.push_back(stringAttr("plugin_namespace", ""));
    return own;
}

class ParserFields
{
public:
    // loadFields: walk the creator's field names, pass those the node has, typed by attribute kind.
    ParserFields(nvinfer1::IPluginCreator& creator, std::vector<Attribute> const& attributes)
    {
        nvinfer1::PluginFieldCollection const* names = creator.getFieldNames();
        for (int32_t i = 0; names != nullptr && i < names->nbFields; ++i)
        {
            auto const found = std::find_if(attributes.begin(), attributes.end(),
                [&](Attribute const& a) { return a.name == names->fields[i].name; });
            if (found == attributes.end())
            {
                continue; // the parser warns and leaves the creator's default
            }
            mNames.push_back(found->name);
            std::vector<char>& bytes = mData.emplace_back();
            PluginFieldType type{};
            int32_t length = 0;
            switch (found->kind)
            {
            case Attribute::kInt:
            case Attribute::kInts:
                bytes.resize(found->ints.size() * sizeof(int32_t));
                std::memcpy(bytes.data(), found->ints.data(), bytes.size());
                type = PluginFieldType::kINT32;
                length = static_cast<int32_t>(found->ints.size());
                break;
            case Attribute::kFloat:
            case Attribute::kFloats:
                bytes.resize(found->floats.size() * sizeof(float));
                std::memcpy(bytes.data(), found->floats.data(), bytes.size());
                type = PluginFieldType::kFLOAT32;
                length = static_cast<int32_t>(found->floats.size());
                break;
            case Attribute::kString:
                bytes.assign(found->text.begin(), found->text.end());
                bytes.push_back('\0'); // "Append \0 as end of C style string", counted in the length
                type = PluginFieldType::kCHAR;
                length = static_cast<int32_t>(bytes.size());
                break;
            }
            mTypes.push_back(type);
            mLengths.push_back(length);
        }
        for (size_t i = 0; i < mNames.size(); ++i)
        {
            mFields.emplace_back(mNames[i].c_str(), mData[i].data(), mTypes[i], mLengths[i]);
        }
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    nvinfer1::PluginFieldCollection const* collection() const
    {
        return &mCollection;
    }

    bool passes(char const* name) const
    {
        return std::find(mNames.begin(), mNames.end(), name) != mNames.end();
    }

private:
    std::deque<std::string> mNames;
    std::deque<std::vector<char>> mData;
    std::vector<PluginFieldType> mTypes;
    std::vector<int32_t> mLengths;
    std::vector<PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

std::vector<char> bytesOf(nvinfer1::IPluginV2 const& plugin)
{
    std::vector<char> bytes(plugin.getSerializationSize());
    plugin.serialize(bytes.data());
    return bytes;
}

// -- 4. a stand-in of TensorRT's expression builder -----------------------------------------------

namespace apiv = nvinfer1::apiv;

class Expr final : public apiv::VDimensionExpr
{
public:
    Expr(int64_t value, bool constant)
        : mValue(value)
        , mConstant(constant)
    {
    }

    bool isConstant() const override
    {
        return mConstant;
    }

    qwen3vl::trt::DimValue getConstantValue() const override
    {
        return static_cast<qwen3vl::trt::DimValue>(mValue);
    }

#if NV_TENSORRT_MAJOR >= 10
    bool isSizeTensor() const override
    {
        return false;
    }
#endif

    int64_t value() const
    {
        return mValue;
    }

private:
    int64_t mValue;
    bool mConstant;
};

// The public face TensorRT hands plugins (its methods forward to the V* implementation).
class Dimension final : public nvinfer1::IDimensionExpr
{
public:
    explicit Dimension(Expr* impl)
    {
        mImpl = impl;
    }

    int64_t value() const
    {
        return static_cast<Expr const*>(mImpl)->value();
    }
};

class Expressions final : public apiv::VExprBuilder
{
public:
    // A dimension of a network input: known here (`value`), not a build-time constant.
    nvinfer1::IDimensionExpr const* input(int64_t value)
    {
        return make(value, false);
    }

    nvinfer1::IDimensionExpr const* constant(qwen3vl::trt::DimValue value) override
    {
        return make(value, true);
    }

    nvinfer1::IDimensionExpr const* operation(nvinfer1::DimensionOperation op, nvinfer1::IDimensionExpr const& first,
        nvinfer1::IDimensionExpr const& second) override
    {
        using nvinfer1::DimensionOperation;
        int64_t const a = static_cast<Dimension const&>(first).value();
        int64_t const b = static_cast<Dimension const&>(second).value();
        int64_t v = 0;
        switch (op)
        {
        case DimensionOperation::kSUM: v = a + b; break;
        case DimensionOperation::kPROD: v = a * b; break;
        case DimensionOperation::kMAX: v = std::max(a, b); break;
        case DimensionOperation::kMIN: v = std::min(a, b); break;
        case DimensionOperation::kSUB: v = a - b; break;
        case DimensionOperation::kEQUAL: v = a == b; break;
        case DimensionOperation::kLESS: v = a < b; break;
        case DimensionOperation::kFLOOR_DIV: v = b ? a / b : 0; break;
        case DimensionOperation::kCEIL_DIV: v = b ? (a + b - 1) / b : 0; break;
        }
        return make(v, first.isConstant() && second.isConstant());
    }

#if NV_TENSORRT_MAJOR >= 10
    nvinfer1::IDimensionExpr const* declareSizeTensor(
        int32_t, nvinfer1::IDimensionExpr const&, nvinfer1::IDimensionExpr const&) override
    {
        return nullptr; // no data-dependent shapes in these plugins
    }
#endif

private:
    nvinfer1::IDimensionExpr const* make(int64_t value, bool constant)
    {
        Expr* impl = &mExprs.emplace_back(value, constant);
        return &mDimensions.emplace_back(impl);
    }

    std::deque<Expr> mExprs;
    std::deque<Dimension> mDimensions;
};

class Builder final : public nvinfer1::IExprBuilder
{
public:
    explicit Builder(Expressions& impl)
    {
        mImpl = &impl;
    }
};

// A tensor of the network: dims known here, and the type TensorRT would pick for it.
struct Tensor
{
    std::vector<int64_t> dims;
    DataType type;
};

struct Shape
{
    std::vector<int64_t> dims;
    std::vector<bool> constant; // which dims must be build-time constants (empty: none)
};

// -- 2 to 4 for one plugin -------------------------------------------------------------------------

char const* typeName(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT: return "FLOAT";
    case DataType::kHALF: return "HALF";
    case DataType::kINT32: return "INT32";
    case DataType::kINT8: return "INT8";
    case DataType::kBOOL: return "BOOL";
    case DataType::kUINT8: return "UINT8";
    default: return "other";
    }
}

std::string typeSet(std::vector<DataType> const& types)
{
    std::string out = "{";
    for (DataType t : types)
    {
        out += std::string(out.size() > 1 ? " " : "") + typeName(t);
    }
    return out + "}";
}

struct Case
{
    std::string label;
    std::vector<Attribute> attributes;
    std::vector<char> intended; // serialized bytes of the plugin made from the intended values
    std::vector<Tensor> inputs;
    std::vector<Tensor> outputs; // the types TensorRT would pick (dims unused)
    // Per position (inputs, then outputs): the types the plugin must accept there, earlier positions
    // fixed to `inputs`/`outputs`.
    std::vector<std::vector<DataType>> accepted;
    std::vector<Shape> shapes; // getOutputDimensions
};

template <typename Creator>
void check(char const* name, Case const& c)
{
    std::string const label = std::string(name) + " [" + c.label + "]";
    Creator creator;
    creator.setPluginNamespace("creator_ns");
    expect(std::strcmp(creator.getPluginName(), name) == 0, label, "creator name");
    expect(std::strcmp(creator.getPluginVersion(), "1") == 0, label, "creator version");
    ParserFields fields(creator, c.attributes);
    for (Attribute const& a : c.attributes)
    {
        bool const bookkeeping = a.name == "plugin_version" || a.name == "plugin_namespace";
        expect(bookkeeping != fields.passes(a.name.c_str()), label,
            "attribute " + a.name + (bookkeeping ? " is listed by the creator" : " is not among the creator's fields: "
                                                                                  "the parser would never pass it"));
    }
    auto* plugin = static_cast<nvinfer1::IPluginV2DynamicExt*>(creator.createPlugin("node", fields.collection()));
    expect(plugin != nullptr, label, "createPlugin refused the fields the parser builds");
    if (plugin == nullptr)
    {
        return;
    }
    std::vector<char> const bytes = bytesOf(*plugin);
    expect(bytes == c.intended, label, "the plugin made from the parser's fields differs from the intended one");

    // 2. lifecycle
    plugin->setPluginNamespace("plugin_ns");
    expect(std::strcmp(plugin->getPluginType(), name) == 0, label, "plugin type");
    expect(std::strcmp(plugin->getPluginVersion(), "1") == 0, label, "plugin version");
    expect(std::strcmp(plugin->getPluginNamespace(), "plugin_ns") == 0, label, "plugin namespace");
    expect(plugin->initialize() == 0, label, "initialize");
    nvinfer1::IPluginV2DynamicExt* copy = plugin->clone();
    expect(copy != nullptr && bytesOf(*copy) == bytes, label, "clone differs");
    expect(copy != nullptr && std::strcmp(copy->getPluginNamespace(), "plugin_ns") == 0, label, "clone namespace");
    nvinfer1::IPluginV2* restored = creator.deserializePlugin("node", bytes.data(), bytes.size());
    expect(restored != nullptr && bytesOf(*restored) == bytes, label, "deserialized plugin differs");
    expect(restored != nullptr && std::strcmp(restored->getPluginNamespace(), "creator_ns") == 0, label,
        "deserialized plugin lacks the creator's namespace");
    expect(creator.deserializePlugin("node", bytes.data(), bytes.size() - 1) == nullptr, label,
        "truncated bytes accepted");

    // 3. formats
    int32_t const nbInputs = static_cast<int32_t>(c.inputs.size());
    int32_t const nbOutputs = static_cast<int32_t>(c.outputs.size());
    expect(plugin->getNbOutputs() == nbOutputs, label, "getNbOutputs");
    std::vector<nvinfer1::PluginTensorDesc> inOut(nbInputs + nbOutputs);
    for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
    {
        Tensor const& tensor = pos < nbInputs ? c.inputs[pos] : c.outputs[pos - nbInputs];
        inOut[pos].dims.nbDims = static_cast<int32_t>(tensor.dims.size());
        for (size_t i = 0; i < tensor.dims.size(); ++i)
        {
            inOut[pos].dims.d[i] = static_cast<qwen3vl::trt::DimValue>(tensor.dims[i]);
        }
        inOut[pos].scale = 1.0F;
    }
    for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
    {
        std::vector<DataType> got;
        for (DataType offered : {DataType::kFLOAT, DataType::kHALF, DataType::kINT32})
        {
            inOut[pos].type = offered;
            inOut[pos].format = nvinfer1::TensorFormat::kLINEAR;
            if (plugin->supportsFormatCombination(pos, inOut.data(), nbInputs, nbOutputs))
            {
                got.push_back(offered);
            }
        }
        for (DataType refused : {DataType::kINT8, DataType::kUINT8, DataType::kBOOL})
        {
            inOut[pos].type = refused;
            expect(!plugin->supportsFormatCombination(pos, inOut.data(), nbInputs, nbOutputs), label,
                "position " + std::to_string(pos) + " accepts " + typeName(refused));
        }
        Tensor const& chosen = pos < nbInputs ? c.inputs[pos] : c.outputs[pos - nbInputs];
        inOut[pos].type = chosen.type;
        inOut[pos].format = nvinfer1::TensorFormat::kCHW32;
        expect(!plugin->supportsFormatCombination(pos, inOut.data(), nbInputs, nbOutputs), label,
            "position " + std::to_string(pos) + " accepts a non-linear format");
        inOut[pos].format = nvinfer1::TensorFormat::kLINEAR;
        expect(got == c.accepted[pos], label,
            "position " + std::to_string(pos) + " accepts " + typeSet(got) + ", the contract says "
                + typeSet(c.accepted[pos]));
    }
    std::vector<DataType> inputTypes;
    for (Tensor const& t : c.inputs)
    {
        inputTypes.push_back(t.type);
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        expect(plugin->getOutputDataType(i, inputTypes.data(), nbInputs) == c.outputs[i].type, label,
            "getOutputDataType of output " + std::to_string(i));
    }

    // 4. output dimensions
    Expressions expressions;
    Builder builder(expressions);
    std::vector<nvinfer1::DimsExprs> dims(c.inputs.size());
    for (size_t i = 0; i < c.inputs.size(); ++i)
    {
        dims[i].nbDims = static_cast<int32_t>(c.inputs[i].dims.size());
        for (size_t j = 0; j < c.inputs[i].dims.size(); ++j)
        {
            dims[i].d[j] = expressions.input(c.inputs[i].dims[j]);
        }
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        nvinfer1::DimsExprs const out = plugin->getOutputDimensions(i, dims.data(), nbInputs, builder);
        Shape const& want = c.shapes[i];
        bool ok = out.nbDims == static_cast<int32_t>(want.dims.size());
        std::string got = "(";
        for (int32_t j = 0; j < out.nbDims && ok; ++j)
        {
            auto const* d = static_cast<Dimension const*>(out.d[j]);
            got += std::to_string(d->value()) + (j + 1 < out.nbDims ? ", " : "");
            ok = d->value() == want.dims[j] && (want.constant.empty() || !want.constant[j] || d->isConstant());
        }
        expect(ok, label, "getOutputDimensions of output " + std::to_string(i) + ": " + got + ")");
    }

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

template <typename Creator>
void refuses(char const* name, std::string const& what, std::vector<Attribute> const& attributes)
{
    Creator creator;
    ParserFields fields(creator, attributes);
    nvinfer1::IPluginV2* plugin = creator.createPlugin("node", fields.collection());
    expect(plugin == nullptr, name, "createPlugin accepted " + what);
    if (plugin != nullptr)
    {
        plugin->destroy();
    }
}

constexpr DataType F = DataType::kFLOAT;
constexpr DataType H = DataType::kHALF;
constexpr DataType I = DataType::kINT32;

} // namespace

int main()
{
    using namespace qwen3vl::plugin;
    using Types = std::vector<DataType>;

    // Qwen3VLAttention: B=2, S=5, H=16, KV=8, D=128, M=64; FP32 activations, FP16 cache (the Pascal
    // mode), and FP16 activations with an FP32 cache.
    for (bool halfCache : {true, false})
    {
        DataType const t = halfCache ? F : H;
        DataType const c = halfCache ? H : F;
        char const* cache = halfCache ? "fp16" : "fp32";
        check<AttentionPluginCreator>("Qwen3VLAttention",
            {std::string("T ") + typeName(t) + ", cache " + cache,
                node({intAttr("num_heads", 16), intAttr("kv_num_heads", 8), intAttr("head_dim", 128),
                    floatAttr("scale", 0.088F), floatAttr("epsilon", 1e-6F), stringAttr("kv_cache_type", cache)}),
                bytesOf(AttentionPlugin(16, 8, 128, 0.088F, 1e-6F, halfCache ? QWEN3VL_FLOAT16 : QWEN3VL_FLOAT32)),
                {{{2, 5, 2048}, t}, {{2, 5, 1024}, t}, {{2, 5, 1024}, t}, {{128}, t}, {{128}, t}, {{2, 5, 128}, t},
                    {{2, 5, 128}, t}, {{2, 8, 64, 128}, c}, {{2, 8, 64, 128}, c}, {{2}, I}, {{1}, I}},
                {{{}, t}, {{}, c}, {{}, c}},
                {Types{F, H}, {t}, {t}, {t}, {t}, {t}, {t}, {c}, {c}, {I}, {I}, {t}, {c}, {c}},
                {{{2, 5, 2048}, {}}, {{2, 8, 64, 128}, {}}, {{2, 8, 64, 128}, {}}}});
    }
    refuses<AttentionPluginCreator>("Qwen3VLAttention", "kv_cache_type int8",
        node({intAttr("num_heads", 16), intAttr("kv_num_heads", 8), intAttr("head_dim", 128),
            floatAttr("scale", 0.088F), floatAttr("epsilon", 1e-6F), stringAttr("kv_cache_type", "int8")}));

    // Qwen3VLRMSNorm: the residual form with the sum passed on, and the plain form.
    check<RMSNormPluginCreator>("Qwen3VLRMSNorm",
        {"has_skip, emit_sum", node({floatAttr("epsilon", 1e-6F), intAttr("has_skip", 1), intAttr("emit_sum", 1)}),
            bytesOf(RMSNormPlugin(1e-6F, true, true)), {{{2, 5, 2048}, H}, {{2, 5, 2048}, H}, {{2048}, H}},
            {{{}, H}, {{}, H}}, {Types{F, H}, {H}, {H}, {H}, {H}}, {{{2, 5, 2048}, {}}, {{2, 5, 2048}, {}}}});
    check<RMSNormPluginCreator>("Qwen3VLRMSNorm",
        {"plain", node({floatAttr("epsilon", 1e-6F), intAttr("has_skip", 0), intAttr("emit_sum", 0)}),
            bytesOf(RMSNormPlugin(1e-6F, false, false)), {{{2, 5, 16, 128}, F}, {{128}, F}}, {{{}, F}},
            {Types{F, H}, {F}, {F}}, {{{2, 5, 16, 128}, {}}}});

    // Qwen3VLVisionAttention: N=300 patches in F=2 frames of at most L=196; indices int32, no mask.
    check<VisionAttentionPluginCreator>("Qwen3VLVisionAttention",
        {"int32 layout", node({intAttr("num_heads", 16), intAttr("head_dim", 64), floatAttr("scale", 0.125F)}),
            bytesOf(VisionAttentionPlugin(16, 64, 0.125F)),
            {{{300, 1024}, F}, {{300, 1024}, F}, {{300, 1024}, F}, {{2, 196}, I}, {{300}, I}}, {{{}, F}},
            {Types{F, H}, {F}, {F}, {I}, {I}, {F}}, {{{300, 1024}, {}}}});

    // Qwen3VLWeightOnlyGemm: K=2048, N=6144, int4 block 64 (blob 32 bytes = 8 words), zero points
    // (6144 rows of 16 bytes = 24576 words) and a bias; and int8 block 128 without them.
    WeightOnlyGemmPlugin::Attributes const asym{2048, 6144, 4, 64, 4, true, true};
    check<WeightOnlyGemmPluginCreator>("Qwen3VLWeightOnlyGemm",
        {"int4 b64 zero points, bias",
            node({intAttr("K", 2048), intAttr("N", 6144), intAttr("bits", 4), intAttr("block_size", 64),
                intAttr("accuracy_level", 4), intAttr("has_zero_points", 1), intAttr("has_bias", 1)}),
            bytesOf(WeightOnlyGemmPlugin(asym)),
            {{{1, 3, 2048}, F}, {{6144, 32, 8}, I}, {{6144, 32}, F}, {{24576}, I}, {{6144}, F}}, {{{}, F}},
            {Types{F, H}, {I}, {F}, {I}, {F}, {F}}, {{{1, 3, 6144}, {false, false, true}}}});
    WeightOnlyGemmPlugin::Attributes const sym{2048, 2048, 8, 128, 0, false, false};
    check<WeightOnlyGemmPluginCreator>("Qwen3VLWeightOnlyGemm",
        {"int8 b128 symmetric",
            node({intAttr("K", 2048), intAttr("N", 2048), intAttr("bits", 8), intAttr("block_size", 128),
                intAttr("accuracy_level", 0), intAttr("has_zero_points", 0), intAttr("has_bias", 0)}),
            bytesOf(WeightOnlyGemmPlugin(sym)), {{{4, 2048}, H}, {{2048, 16, 32}, I}, {{2048, 16}, H}}, {{{}, H}},
            {Types{F, H}, {I}, {H}, {H}}, {{{4, 2048}, {false, true}}}});

    // Qwen3VLQuantizedGather: the tied table (151936 rows, 2048 wide, int4 block 64) read as int32
    // (V, 32, 8), int32 ids (2, 7), zero points of 16 bytes a row.
    check<QuantizedGatherPluginCreator>("Qwen3VLQuantizedGather",
        {"int4 b64 zero points",
            node({intAttr("bits", 4), intAttr("block_size", 64), intAttr("has_zero_points", 1)}),
            bytesOf(QuantizedGatherPlugin(4, 64, true)),
            {{{151936, 32, 8}, I}, {{2, 7}, I}, {{151936, 32}, F}, {{607744}, I}}, {{{}, F}},
            {Types{I}, {I}, {F, H}, {I}, {F}}, {{{2, 7, 2048}, {}}}});

    std::printf("%s\n", failures ? "FAILED" : "all plugins ok");
    return failures ? 1 : 0;
}

QWEN3VL_LEGACY_PLUGIN_API_END
