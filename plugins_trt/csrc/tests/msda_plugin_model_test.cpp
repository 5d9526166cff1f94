// Drives the real plugin source (plugin/msda_plugin.cpp) through the TensorRT 10 interface model in trt_api_model/:
// library entry points, creator, capabilities, format/type/shape rules through TensorRT's types, serialisation, and
// enqueue on host memory, with msda_forward served by the CPU build of the kernel (msda_forward_host). The output is
// compared with a double-precision loop. Built with g++ by tests/test_plugin.py; exits 1 on any failed check.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "check.h"
#include "msda_api.h"
#include "msda_plugin.h"
#include "msda_plugin_info.h"

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(ILoggerFinder* finder);

// The plugin calls msda_forward; here it runs on the host build (same arguments, host pointers).
extern "C" int msda_forward(const void* value, const void* spatial_shapes, const void* level_start_index,
                            const float* sampling_locations, const float* attention_weights, void* output,
                            int64_t batch, int64_t spatial, int64_t heads, int64_t channels, int64_t queries,
                            int64_t levels, int64_t points, int value_dtype, int index_dtype, void* stream) {
    return msda_forward_host(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
                             batch, spatial, heads, channels, queries, levels, points, value_dtype, index_dtype, stream);
}

namespace {

struct RecordingLogger : ILogger {
    std::vector<std::string> messages;
    void log(Severity, AsciiChar const* msg) noexcept override { messages.emplace_back(msg); }
};
struct Finder : ILoggerFinder {
    RecordingLogger logger;
    ILogger* findLogger() override { return &logger; }
};

Dims dims(std::initializer_list<int64_t> d) {
    Dims out{};
    out.nbDims = static_cast<int32_t>(d.size());
    int i = 0;
    for (int64_t v : d) out.d[i++] = v;
    return out;
}

PluginTensorDesc desc(Dims d, DataType t, TensorFormat f = TensorFormat::kLINEAR) { return PluginTensorDesc{d, t, f, 1.0f}; }

DynamicPluginTensorDesc dyn(PluginTensorDesc d) { return DynamicPluginTensorDesc{d, d.dims, d.dims, d.dims}; }

}  // namespace

int main() {
    Finder finder;
    setLoggerFinder(&finder);

    // ---- library entry point and creator
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    EXPECT(n == 1 && creators != nullptr && creators[0] != nullptr);
    EXPECT(std::string(creators[0]->getInterfaceInfo().kind) == "PLUGIN CREATOR_V3ONE");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    EXPECT(std::string(creator->getPluginName()) == LAYERFUSE_MSDA_PLUGIN_NAME);
    EXPECT(std::string(creator->getPluginVersion()) == LAYERFUSE_MSDA_PLUGIN_VERSION);
    EXPECT(std::string(creator->getPluginNamespace()) == LAYERFUSE_MSDA_PLUGIN_NAMESPACE);
    EXPECT(creator->getFieldNames() != nullptr && creator->getFieldNames()->nbFields == 0);

    char const version[] = "1";
    PluginField fields[2] = {PluginField("plugin_version", version, PluginFieldType::kCHAR, 2),
                             PluginField("im2col_step", version, PluginFieldType::kCHAR, 2)};
    PluginFieldCollection fc{2, fields};
    IPluginV3* plugin = creator->createPlugin("msda_0", &fc, TensorRTPhase::kBUILD);
    EXPECT(plugin != nullptr);
    bool warned = false;
    for (auto const& m : finder.logger.messages) warned = warned || m.find("im2col_step") != std::string::npos;
    EXPECT(warned);

    // ---- capabilities
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    EXPECT(core != nullptr && build != nullptr && runtime != nullptr);
    EXPECT(std::string(core->getInterfaceInfo().kind) == "PLUGIN_V3ONE_CORE");
    EXPECT(std::string(build->getInterfaceInfo().kind) == "PLUGIN_V3ONE_BUILD");
    EXPECT(std::string(runtime->getInterfaceInfo().kind) == "PLUGIN_V3ONE_RUNTIME");
    EXPECT(std::string(core->getPluginName()) == LAYERFUSE_MSDA_PLUGIN_NAME);
    EXPECT(std::string(core->getPluginNamespace()) == LAYERFUSE_MSDA_PLUGIN_NAMESPACE);
    EXPECT(build->getNbOutputs() == 1);

    // ---- formats and types through TensorRT's enums
    // value [B=1, S=20, H=2, Dh=4]; levels (4, 4) and (2, 2); loc [1, Q=3, 2, L=2, P=2, 2]; attn [1, 3, 2, 2, 2]
    PluginTensorDesc in[5] = {desc(dims({1, 20, 2, 4}), DataType::kFLOAT), desc(dims({2, 2}), DataType::kINT64),
                              desc(dims({2}), DataType::kINT64), desc(dims({1, 3, 2, 2, 2, 2}), DataType::kFLOAT),
                              desc(dims({1, 3, 2, 2, 2}), DataType::kFLOAT)};
    PluginTensorDesc out_desc = desc(dims({1, 3, 8}), DataType::kFLOAT);
    DynamicPluginTensorDesc io[6] = {dyn(in[0]), dyn(in[1]), dyn(in[2]), dyn(in[3]), dyn(in[4]), dyn(out_desc)};
    for (int pos = 0; pos < 6; ++pos) EXPECT(build->supportsFormatCombination(pos, io, 5, 1));
    io[0].desc.type = DataType::kHALF;
    EXPECT(build->supportsFormatCombination(0, io, 5, 1));
    EXPECT(!build->supportsFormatCombination(5, io, 5, 1));  // output must follow the value's type
    io[0].desc.type = DataType::kINT8;
    EXPECT(!build->supportsFormatCombination(0, io, 5, 1));
    io[0].desc.type = DataType::kFLOAT;
    io[0].desc.format = TensorFormat::kHWC8;
    EXPECT(!build->supportsFormatCombination(0, io, 5, 1));
    io[0].desc.format = TensorFormat::kLINEAR;
    io[3].desc.type = DataType::kHALF;
    EXPECT(!build->supportsFormatCombination(3, io, 5, 1));
    io[3].desc.type = DataType::kFLOAT;
    io[2].desc.type = DataType::kINT32;
    EXPECT(!build->supportsFormatCombination(2, io, 5, 1));  // index inputs share one type
    io[2].desc.type = DataType::kINT64;

    DataType input_types[5] = {DataType::kBF16, DataType::kINT32, DataType::kINT32, DataType::kFLOAT, DataType::kFLOAT};
    DataType out_type = DataType::kFLOAT;
    EXPECT(build->getOutputDataTypes(&out_type, 1, input_types, 5) == 0 && out_type == DataType::kBF16);
    input_types[0] = DataType::kINT32;
    EXPECT(build->getOutputDataTypes(&out_type, 1, input_types, 5) != 0);

    // ---- shapes: [B, Q, H*Dh] with B and Q dynamic
    IExprBuilder eb;
    DimsExprs shape_in[5];
    int64_t const concrete[5][6] = {{-1, 20, 2, 4}, {2, 2}, {2}, {-1, -1, 2, 2, 2, 2}, {-1, -1, 2, 2, 2}};
    int const ranks[5] = {4, 2, 1, 6, 5};
    for (int i = 0; i < 5; ++i) {
        shape_in[i].nbDims = ranks[i];
        for (int k = 0; k < ranks[i]; ++k) shape_in[i].d[k] = concrete[i][k] < 0 ? eb.unknown() : eb.constant(concrete[i][k]);
    }
    DimsExprs shape_out[1];
    EXPECT(build->getOutputShapes(shape_in, 5, nullptr, 0, shape_out, 1, eb) == 0);
    EXPECT(shape_out[0].nbDims == 3 && shape_out[0].d[0] == shape_in[0].d[0] && shape_out[0].d[1] == shape_in[3].d[1]);
    EXPECT(shape_out[0].d[2]->isConstant() && shape_out[0].d[2]->getConstantValue() == 8);
    shape_in[4].d[3] = eb.constant(3);  // L mismatch
    EXPECT(build->getOutputShapes(shape_in, 5, nullptr, 0, shape_out, 1, eb) != 0);

    DynamicPluginTensorDesc cfg_in[5] = {dyn(in[0]), dyn(in[1]), dyn(in[2]), dyn(in[3]), dyn(in[4])};
    DynamicPluginTensorDesc cfg_out[1] = {dyn(out_desc)};
    EXPECT(build->configurePlugin(cfg_in, 5, cfg_out, 1) == 0);
    cfg_in[3].desc.dims.d[2] = 3;  // heads mismatch
    EXPECT(build->configurePlugin(cfg_in, 5, cfg_out, 1) != 0);
    EXPECT(build->getWorkspaceSize(cfg_in, 5, cfg_out, 1) == 0);
    EXPECT(runtime->onShapeChange(in, 5, &out_desc, 1) == 0);

    // ---- enqueue on host memory (the host build stands in for the CUDA launcher)
    std::vector<float> value(1 * 20 * 2 * 4), loc(1 * 3 * 2 * 2 * 2 * 2), attn(1 * 3 * 2 * 2 * 2), out(1 * 3 * 8, -7.f);
    for (size_t i = 0; i < value.size(); ++i) value[i] = std::sin(0.37f * static_cast<float>(i));
    for (size_t i = 0; i < loc.size(); ++i) loc[i] = static_cast<float>((i * 37) % 64) / 48.0f - 0.1f;
    for (size_t i = 0; i < attn.size(); ++i) attn[i] = 0.05f + 0.02f * static_cast<float>(i % 5);
    int64_t const shapes[4] = {4, 4, 2, 2}, starts[2] = {0, 16};
    void const* inputs[5] = {value.data(), shapes, starts, loc.data(), attn.data()};
    void* outputs[1] = {out.data()};
    EXPECT(runtime->enqueue(in, &out_desc, inputs, outputs, nullptr, nullptr) == 0);
    double worst = 0.0;
    for (int q = 0; q < 3; ++q)
        for (int h = 0; h < 2; ++h)
            for (int c = 0; c < 4; ++c) {
                double acc = 0.0;
                for (int l = 0; l < 2; ++l)
                    for (int p = 0; p < 2; ++p) {
                        int const hh = static_cast<int>(shapes[2 * l]), ww = static_cast<int>(shapes[2 * l + 1]);
                        size_t const lp = ((static_cast<size_t>(q) * 2 + h) * 2 + l) * 2 + p;
                        double const x = loc[2 * lp] * ww - 0.5, y = loc[2 * lp + 1] * hh - 0.5;
                        double const x0 = std::floor(x), y0 = std::floor(y);
                        for (int dy = 0; dy < 2; ++dy)
                            for (int dx = 0; dx < 2; ++dx) {
                                int const cx = static_cast<int>(x0) + dx, cy = static_cast<int>(y0) + dy;
                                if (cx < 0 || cx >= ww || cy < 0 || cy >= hh) continue;
                                double const w = (1 - std::fabs(x - cx)) * (1 - std::fabs(y - cy));
                                size_t const row = static_cast<size_t>(starts[l] + cy * ww + cx);
                                acc += attn[lp] * w * value[(row * 2 + h) * 4 + c];
                            }
                    }
                worst = std::fmax(worst, std::fabs(acc - out[(q * 2 + h) * 4 + c]));
            }
    EXPECT(worst < 1e-5);
    PluginTensorDesc bad_in[5] = {in[0], in[1], in[2], in[3], in[4]};
    bad_in[0].dims.d[2] = 3;
    EXPECT(runtime->enqueue(bad_in, &out_desc, inputs, outputs, nullptr, nullptr) != 0);

    // ---- serialisation and cloning
    PluginFieldCollection const* serial = runtime->getFieldsToSerialize();
    EXPECT(serial != nullptr && serial->nbFields == 0);
    IPluginV3* restored = creator->createPlugin("msda_0", serial, TensorRTPhase::kRUNTIME);
    IPluginV3* attached = runtime->attachToContext(nullptr);
    IPluginV3* cloned = plugin->clone();
    EXPECT(restored != nullptr && attached != nullptr && cloned != nullptr && attached != plugin);
    auto* attached_core = static_cast<IPluginV3OneCore*>(attached->getCapabilityInterface(PluginCapabilityType::kCORE));
    EXPECT(std::string(attached_core->getPluginVersion()) == LAYERFUSE_MSDA_PLUGIN_VERSION);
    delete restored;
    delete attached;
    delete cloned;
    delete plugin;
    setLoggerFinder(nullptr);

    return msda_test::check_report();
}
