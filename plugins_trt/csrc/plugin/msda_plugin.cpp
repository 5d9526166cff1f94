// MSDeformAttn TensorRT plugin: TensorRT types -> msda_plugin_rules.h, enqueue -> msda_forward (msda_api.h).
#include "msda_plugin.h"

#include <exception>
#include <mutex>
#include <new>
#include <string>

#include "msda_api.h"
#include "msda_plugin_info.h"

using nvinfer1::AsciiChar;
using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginTensorDesc;

namespace msda {
namespace plugin {

namespace {

// Logger handed over by TensorRT through setLoggerFinder (nullptr until then: messages are dropped).
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept {
    try {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        nvinfer1::ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
        if (logger != nullptr) logger->log(severity, ("[" LAYERFUSE_MSDA_PLUGIN_NAME "] " + message).c_str());
    } catch (...) {
    }
}

void log_error(std::string const& message) noexcept { log(nvinfer1::ILogger::Severity::kERROR, message); }

Type to_rule_type(DataType t) {
    switch (t) {
        case DataType::kFLOAT:
            return Type::kFloat;
        case DataType::kHALF:
            return Type::kHalf;
        case DataType::kBF16:
            return Type::kBFloat16;
        case DataType::kINT32:
            return Type::kInt32;
        case DataType::kINT64:
            return Type::kInt64;
        default:
            return Type::kOther;
    }
}

Shape to_shape(nvinfer1::Dims const& dims) {
    Shape s{};
    s.rank = dims.nbDims;
    for (int32_t i = 0; i < dims.nbDims && i < kMaxRank; ++i) s.d[i] = dims.d[i];
    return s;
}

// Constant dimension values where known (-1 otherwise), to run the rule checks at build time.
Shape to_shape(DimsExprs const& dims) {
    Shape s{};
    s.rank = dims.nbDims;
    for (int32_t i = 0; i < dims.nbDims && i < kMaxRank; ++i)
        s.d[i] = dims.d[i] != nullptr && dims.d[i]->isConstant() ? dims.d[i]->getConstantValue() : -1;
    return s;
}

}  // namespace

// ---- MsdaPlugin ------------------------------------------------------------------------------------------------

MsdaPlugin::MsdaPlugin() = default;

MsdaPlugin::MsdaPlugin(MsdaPlugin const& /*other*/)
    : nvinfer1::IPluginV3(), nvinfer1::IPluginV3OneCore(), nvinfer1::IPluginV3OneBuild(),
      nvinfer1::IPluginV3OneRuntime() {}

nvinfer1::IPluginCapability* MsdaPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
    switch (type) {
        case nvinfer1::PluginCapabilityType::kCORE:
            return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD:
            return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME:
            return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* MsdaPlugin::clone() noexcept {
    try {
        return new MsdaPlugin(*this);
    } catch (std::exception const& e) {
        log_error(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

AsciiChar const* MsdaPlugin::getPluginName() const noexcept { return LAYERFUSE_MSDA_PLUGIN_NAME; }
AsciiChar const* MsdaPlugin::getPluginVersion() const noexcept { return LAYERFUSE_MSDA_PLUGIN_VERSION; }
AsciiChar const* MsdaPlugin::getPluginNamespace() const noexcept { return LAYERFUSE_MSDA_PLUGIN_NAMESPACE; }

int32_t MsdaPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                    DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
        log_error("expects 5 inputs and 1 output");
        return -1;
    }
    Shape shapes[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) shapes[i] = to_shape(in[i].desc.dims);
    std::string const err = check_shapes(shapes, kNbInputs);
    if (!err.empty()) {
        log_error(err);
        return -1;
    }
    return 0;
}

int32_t MsdaPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                       int32_t nbInputs) const noexcept {
    if (nbOutputs != kNbOutputs || nbInputs != kNbInputs) return -1;
    Type types[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) types[i] = to_rule_type(inputTypes[i]);
    Type out;
    if (!output_type(types, nbInputs, &out)) {
        log_error("value must be float32, float16 or bfloat16");
        return -1;
    }
    outputTypes[0] = inputTypes[kValue];
    return 0;
}

int32_t MsdaPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                                    nvinfer1::IExprBuilder& exprBuilder) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    Shape shapes[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) shapes[i] = to_shape(inputs[i]);
    std::string const err = check_shapes(shapes, kNbInputs);
    if (!err.empty()) {
        log_error(err);
        return -1;
    }
    DimsExprs const& value = inputs[kValue];  // [B, S, H, Dh]
    outputs[0].nbDims = 3;                     // [B, Q, H*Dh]
    outputs[0].d[0] = value.d[0];
    outputs[0].d[1] = inputs[kSamplingLocations].d[1];
    outputs[0].d[2] = exprBuilder.operation(nvinfer1::DimensionOperation::kPROD, *value.d[2], *value.d[3]);
    return outputs[0].d[2] != nullptr ? 0 : -1;
}

bool MsdaPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                           int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= nbInputs + nbOutputs) return false;
    TensorFormat formats[kNbInputs + kNbOutputs];
    for (int32_t i = 0; i <= pos; ++i)  // only inOut[0..pos] is meaningful
        formats[i] = TensorFormat{to_rule_type(inOut[i].desc.type), inOut[i].desc.format == nvinfer1::TensorFormat::kLINEAR};
    return supports_format(pos, formats, nbInputs, nbOutputs);
}

int32_t MsdaPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

size_t MsdaPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
                                    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept {
    return 0;  // the forward kernel needs no scratch
}

int32_t MsdaPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
                                  int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    Shape shapes[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) shapes[i] = to_shape(in[i].dims);
    Sizes sizes{};
    std::string const err = sizes_from_shapes(shapes, kNbInputs, &sizes);
    if (!err.empty()) {
        log_error(err);
        return -1;
    }
    return 0;
}

int32_t MsdaPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                            void const* const* inputs, void* const* outputs, void* /*workspace*/,
                            cudaStream_t stream) noexcept {
    Shape shapes[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) shapes[i] = to_shape(inputDesc[i].dims);
    Sizes s{};
    std::string const err = sizes_from_shapes(shapes, kNbInputs, &s);
    if (!err.empty()) {
        log_error(err);
        return -1;
    }
    int const status = msda_forward(inputs[kValue], inputs[kSpatialShapes], inputs[kLevelStartIndex],
                                    static_cast<float const*>(inputs[kSamplingLocations]),
                                    static_cast<float const*>(inputs[kAttentionWeights]), outputs[0], s.batch,
                                    s.spatial, s.heads, s.channels, s.queries, s.levels, s.points,
                                    value_dtype_code(to_rule_type(inputDesc[kValue].type)),
                                    index_dtype_code(to_rule_type(inputDesc[kSpatialShapes].type)), stream);
    if (status != MSDA_STATUS_OK) {
        log_error(std::string("msda_forward: ") + msda_status_string(status) + ": " + msda_last_error());
        return status;
    }
    return 0;
}

nvinfer1::IPluginV3* MsdaPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
    return clone();  // no per-context resources
}

nvinfer1::PluginFieldCollection const* MsdaPlugin::getFieldsToSerialize() noexcept { return &mFieldsToSerialize; }

// ---- MsdaPluginCreator -----------------------------------------------------------------------------------------

MsdaPluginCreator::MsdaPluginCreator() {
    mFieldNames.nbFields = static_cast<int32_t>(mFields.size());
    mFieldNames.fields = mFields.data();
}

nvinfer1::IPluginV3* MsdaPluginCreator::createPlugin(AsciiChar const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
                                                     nvinfer1::TensorRTPhase /*phase*/) noexcept {
    try {
        if (fc != nullptr) {
            for (int32_t i = 0; i < fc->nbFields; ++i) {
                std::string const note = check_field(fc->fields[i].name);
                if (!note.empty()) log(nvinfer1::ILogger::Severity::kWARNING, note);
            }
        }
        return new MsdaPlugin();
    } catch (std::exception const& e) {
        log_error(std::string("createPlugin failed: ") + e.what());
    }
    return nullptr;
}

nvinfer1::PluginFieldCollection const* MsdaPluginCreator::getFieldNames() noexcept { return &mFieldNames; }
AsciiChar const* MsdaPluginCreator::getPluginName() const noexcept { return LAYERFUSE_MSDA_PLUGIN_NAME; }
AsciiChar const* MsdaPluginCreator::getPluginVersion() const noexcept { return LAYERFUSE_MSDA_PLUGIN_VERSION; }
AsciiChar const* MsdaPluginCreator::getPluginNamespace() const noexcept { return LAYERFUSE_MSDA_PLUGIN_NAMESPACE; }

}  // namespace plugin
}  // namespace msda

// ---- library entry points (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins) ------------------------------

extern "C" {

MSDA_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    std::lock_guard<std::mutex> lock(msda::plugin::gLoggerMutex);
    msda::plugin::gLoggerFinder = finder;
}

MSDA_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static msda::plugin::MsdaPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

}  // extern "C"
