// Small helpers the plugins share: serialization, attribute parsing, errors, a creator base class.
#pragma once

#include "trt_version.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

QWEN3VL_LEGACY_PLUGIN_API_BEGIN

namespace qwen3vl
{
namespace plugin
{

// Errors go to stderr with the plugin's name: IPluginV2 offers no logger in 8.6, and a plugin
// method must not throw.
inline void reportError(char const* plugin, char const* message) noexcept
{
    std::fprintf(stderr, "[%s] error: %s\n", plugin, message);
}

// The enqueue status of a kernel launch: 0 on success, else the CUDA error is reported.
inline int32_t launchStatus(cudaError_t error, char const* plugin) noexcept
{
    if (error == cudaSuccess)
    {
        return 0;
    }
    std::fprintf(stderr, "[%s] error: kernel launch failed: %s\n", plugin, cudaGetErrorString(error));
    return 1;
}

// Serialized plugins are raw copies of trivially copyable fields, in order.
class Writer
{
public:
    explicit Writer(void* buffer) noexcept
        : mCursor(static_cast<char*>(buffer))
    {
    }

    template <typename T>
    void write(T const& value) noexcept
    {
        static_assert(std::is_trivially_copyable<T>::value, "plain fields only");
        std::memcpy(mCursor, &value, sizeof(T));
        mCursor += sizeof(T);
    }

private:
    char* mCursor;
};

class Reader
{
public:
    Reader(void const* data, size_t length) noexcept
        : mCursor(static_cast<char const*>(data))
        , mEnd(static_cast<char const*>(data) + length)
        , mOk(data != nullptr)
    {
    }

    // Reads the next field; on a short buffer returns T{} and marks the read failed.
    template <typename T>
    T read() noexcept
    {
        static_assert(std::is_trivially_copyable<T>::value, "plain fields only");
        T value{};
        if (!mOk || static_cast<size_t>(mEnd - mCursor) < sizeof(T))
        {
            mOk = false;
            return value;
        }
        std::memcpy(&value, mCursor, sizeof(T));
        mCursor += sizeof(T);
        return value;
    }

    // Every read succeeded and the buffer is used up exactly.
    bool complete() const noexcept
    {
        return mOk && mCursor == mEnd;
    }

private:
    char const* mCursor;
    char const* mEnd;
    bool mOk;
};

// IEEE half bits -> float, for attributes that arrive as kFLOAT16 (no CUDA header needed).
inline float halfBitsToFloat(uint16_t bits) noexcept
{
    int const sign = (bits >> 15) ? -1 : 1;
    int const exponent = (bits >> 10) & 0x1f;
    int const mantissa = bits & 0x3ff;
    if (exponent == 0)
    {
        return static_cast<float>(sign * std::ldexp(static_cast<double>(mantissa), -24));
    }
    if (exponent == 31)
    {
        return mantissa ? NAN : static_cast<float>(sign) * INFINITY;
    }
    return static_cast<float>(sign * std::ldexp(static_cast<double>(mantissa | 0x400), exponent - 25));
}

// The first value of a numeric field as double. ONNX parsers pass INT attributes as kINT32 (or
// kINT64 from 10.x) and FLOAT as kFLOAT32; every numeric type is accepted so that a creator called
// from the network API with another type still works.
inline bool fieldValue(nvinfer1::PluginField const& field, double& out) noexcept
{
    using nvinfer1::PluginFieldType;
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kFLOAT64: out = *static_cast<double const*>(field.data); return true;
    case PluginFieldType::kFLOAT32: out = *static_cast<float const*>(field.data); return true;
    case PluginFieldType::kFLOAT16: out = halfBitsToFloat(*static_cast<uint16_t const*>(field.data)); return true;
    case PluginFieldType::kINT8: out = *static_cast<int8_t const*>(field.data); return true;
    case PluginFieldType::kINT16: out = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT32: out = *static_cast<int32_t const*>(field.data); return true;
#if NV_TENSORRT_MAJOR >= 10
    case PluginFieldType::kINT64: out = static_cast<double>(*static_cast<int64_t const*>(field.data)); return true;
#endif
    default: return false;
    }
}

// Reads the attributes a creator knows into `out` (name -> pointer). Unknown names are ignored
// (the parser may pass plugin_version/plugin_namespace); a known name of a non-numeric type is an
// error. Returns false and reports on error.
struct FieldTarget
{
    char const* name;
    double* value;
    bool* present;
};

inline bool readFields(
    char const* plugin, nvinfer1::PluginFieldCollection const* fields, FieldTarget const* targets, int count) noexcept
{
    if (fields == nullptr)
    {
        return true;
    }
    for (int32_t i = 0; i < fields->nbFields; ++i)
    {
        nvinfer1::PluginField const& field = fields->fields[i];
        if (field.name == nullptr)
        {
            continue;
        }
        for (int t = 0; t < count; ++t)
        {
            if (std::strcmp(field.name, targets[t].name) != 0)
            {
                continue;
            }
            if (!fieldValue(field, *targets[t].value))
            {
                std::fprintf(stderr, "[%s] error: attribute %s is not a number\n", plugin, field.name);
                return false;
            }
            *targets[t].present = true;
        }
    }
    return true;
}

// An integer attribute value in [low, high].
inline bool integerIn(double value, int64_t low, int64_t high) noexcept
{
    return std::floor(value) == value && value >= static_cast<double>(low) && value <= static_cast<double>(high);
}

inline int64_t volume(nvinfer1::Dims const& dims, int32_t first = 0, int32_t end = -1) noexcept
{
    int32_t const stop = end < 0 ? dims.nbDims : end;
    int64_t v = 1;
    for (int32_t i = first; i < stop; ++i)
    {
        v *= static_cast<int64_t>(dims.d[i]);
    }
    return v;
}

// Namespace, field list and the fixed name/version: what every creator has alike.
class PluginCreatorBase : public nvinfer1::IPluginCreator
{
public:
    void setPluginNamespace(nvinfer1::AsciiChar const* pluginNamespace) noexcept override
    {
        mNamespace = pluginNamespace == nullptr ? "" : pluginNamespace;
    }

    nvinfer1::AsciiChar const* getPluginNamespace() const noexcept override
    {
        return mNamespace.c_str();
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
        return &mFieldCollection;
    }

protected:
    void addField(char const* name, nvinfer1::PluginFieldType type)
    {
        mFields.emplace_back(name, nullptr, type, 1);
    }

    std::string mNamespace;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

// What every plugin has alike: a fixed name and version (`Derived::kName`, `Derived::kVersion`), a
// namespace, no resources to set up, deletion, and cloning by copy.
template <typename Derived>
class PluginBase : public nvinfer1::IPluginV2DynamicExt
{
public:
    nvinfer1::AsciiChar const* getPluginType() const noexcept override
    {
        return Derived::kName;
    }

    nvinfer1::AsciiChar const* getPluginVersion() const noexcept override
    {
        return Derived::kVersion;
    }

    int32_t initialize() noexcept override
    {
        return 0;
    }

    void terminate() noexcept override {}

    void destroy() noexcept override
    {
        delete static_cast<Derived*>(this);
    }

    void setPluginNamespace(nvinfer1::AsciiChar const* pluginNamespace) noexcept override
    {
        try
        {
            mNamespace = pluginNamespace == nullptr ? "" : pluginNamespace;
        }
        catch (...)
        {
            reportError(Derived::kName, "out of memory setting the namespace");
        }
    }

    nvinfer1::AsciiChar const* getPluginNamespace() const noexcept override
    {
        return mNamespace.c_str();
    }

    nvinfer1::IPluginV2DynamicExt* clone() const noexcept override
    {
        try
        {
            return new Derived(static_cast<Derived const&>(*this));
        }
        catch (...)
        {
            reportError(Derived::kName, "out of memory cloning the plugin");
            return nullptr;
        }
    }

private:
    std::string mNamespace;
};

// The creator of `Plugin`: its name and version, and deserialization through Plugin::deserialize
// (nullptr when the bytes are not a serialized Plugin).
template <typename Plugin>
class PluginCreatorOf : public PluginCreatorBase
{
public:
    static constexpr char const* kName = Plugin::kName; // for the creators' error reports

    nvinfer1::AsciiChar const* getPluginName() const noexcept override
    {
        return Plugin::kName;
    }

    nvinfer1::AsciiChar const* getPluginVersion() const noexcept override
    {
        return Plugin::kVersion;
    }

    nvinfer1::IPluginV2* deserializePlugin(
        nvinfer1::AsciiChar const* /*name*/, void const* serialData, size_t serialLength) noexcept override
    {
        Plugin* plugin = Plugin::deserialize(serialData, serialLength);
        if (plugin != nullptr)
        {
            plugin->setPluginNamespace(mNamespace.c_str());
        }
        return plugin;
    }
};

} // namespace plugin
} // namespace qwen3vl

QWEN3VL_LEGACY_PLUGIN_API_END
