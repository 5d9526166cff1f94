// Unit test of msda_plugin_rules.h (the TensorRT-independent plugin logic), built with g++ by tests/test_plugin.py.
// Prints one line per failed check and exits 1 if any failed, else prints "N checks passed" and exits 0.
#include <cstdio>
#include <string>

#include "check.h"
#include "msda_plugin_info.h"
#include "msda_plugin_rules.h"

using namespace msda::plugin;

namespace {

Shape shape(std::initializer_list<int64_t> dims) {
    Shape s{};
    s.rank = static_cast<int32_t>(dims.size());
    int i = 0;
    for (int64_t d : dims) s.d[i++] = d;
    return s;
}

// value [2, 30, 4, 8], shapes [2, 2], starts [2], loc [2, 7, 4, 2, 3, 2], attn [2, 7, 4, 2, 3]
void good_shapes(Shape* in) {
    in[kValue] = shape({2, 30, 4, 8});
    in[kSpatialShapes] = shape({2, 2});
    in[kLevelStartIndex] = shape({2});
    in[kSamplingLocations] = shape({2, 7, 4, 2, 3, 2});
    in[kAttentionWeights] = shape({2, 7, 4, 2, 3});
}

void test_formats() {
    const TensorFormat f32{Type::kFloat, true}, f16{Type::kHalf, true}, b16{Type::kBFloat16, true};
    const TensorFormat i32{Type::kInt32, true}, i64{Type::kInt64, true}, other{Type::kOther, true};
    const TensorFormat f16_chw{Type::kHalf, false};
    for (TensorFormat v : {f32, f16, b16}) {
        for (TensorFormat idx : {i32, i64}) {
            TensorFormat io[6] = {v, idx, idx, f32, f32, v};
            for (int pos = 0; pos < 6; ++pos) EXPECT(supports_format(pos, io, 5, 1));
            TensorFormat wrong_out[6] = {v, idx, idx, f32, f32, v.type == Type::kFloat ? f16 : f32};
            EXPECT(!supports_format(5, wrong_out, 5, 1));  // the output must have the value's type
        }
    }
    TensorFormat io[6] = {f16, i32, i64, f32, f32, f16};
    EXPECT(!supports_format(2, io, 5, 1));  // both index inputs share one dtype
    TensorFormat bad_value[6] = {i32, i32, i32, f32, f32, i32};
    EXPECT(!supports_format(0, bad_value, 5, 1));
    TensorFormat other_value[6] = {other, i32, i32, f32, f32, other};
    EXPECT(!supports_format(0, other_value, 5, 1));
    TensorFormat half_loc[6] = {f16, i32, i32, f16, f16, f16};
    EXPECT(!supports_format(3, half_loc, 5, 1));  // locations and weights stay fp32
    EXPECT(!supports_format(4, half_loc, 5, 1));
    TensorFormat float_index[6] = {f32, f32, f32, f32, f32, f32};
    EXPECT(!supports_format(1, float_index, 5, 1));
    TensorFormat chw[6] = {f16_chw, i32, i32, f32, f32, f16};
    EXPECT(!supports_format(0, chw, 5, 1));  // linear only
    TensorFormat ok[6] = {f32, i32, i32, f32, f32, f32};
    EXPECT(!supports_format(0, ok, 4, 1));
    EXPECT(!supports_format(6, ok, 5, 1));
    EXPECT(!supports_format(-1, ok, 5, 1));
}

void test_output_type() {
    Type out = Type::kOther;
    Type in[5] = {Type::kBFloat16, Type::kInt64, Type::kInt64, Type::kFloat, Type::kFloat};
    EXPECT(output_type(in, 5, &out) && out == Type::kBFloat16);
    in[0] = Type::kInt32;
    EXPECT(!output_type(in, 5, &out));
}

void test_shapes() {
    Shape in[5];
    good_shapes(in);
    EXPECT(check_shapes(in, 5).empty());
    Shape out = output_shape(in);
    EXPECT(out.rank == 3 && out.d[0] == 2 && out.d[1] == 7 && out.d[2] == 32);

    Sizes s{};
    EXPECT(sizes_from_shapes(in, 5, &s).empty());
    EXPECT(s.batch == 2 && s.spatial == 30 && s.heads == 4 && s.channels == 8 && s.queries == 7 && s.levels == 2 &&
           s.points == 3);

    // Unknown (build-time dynamic) dimensions are accepted by the checks, refused at run time.
    good_shapes(in);
    in[kValue].d[0] = -1;
    in[kSamplingLocations].d[1] = -1;
    in[kAttentionWeights].d[1] = -1;
    EXPECT(check_shapes(in, 5).empty());
    out = output_shape(in);
    EXPECT(out.d[0] == -1 && out.d[1] == -1 && out.d[2] == 32);
    in[kValue].d[3] = -1;
    EXPECT(output_shape(in).d[2] == -1);
    EXPECT(!sizes_from_shapes(in, 5, &s).empty());

    const struct {
        int input;
        int dim;
        int64_t value;
        const char* word;  // expected in the message
    } bad[] = {
        {kValue, 0, 3, "batch"},
        {kAttentionWeights, 0, 3, "batch"},
        {kSamplingLocations, 2, 5, "heads"},
        {kSpatialShapes, 1, 3, "spatial_shapes"},
        {kLevelStartIndex, 0, 3, "levels"},
        {kSamplingLocations, 3, 3, "levels"},
        {kSamplingLocations, 5, 3, "sampling_locations"},
        {kAttentionWeights, 4, 4, "points"},
        {kAttentionWeights, 1, 8, "queries"},
    };
    for (const auto& b : bad) {
        good_shapes(in);
        in[b.input].d[b.dim] = b.value;
        const std::string err = check_shapes(in, 5);
        EXPECT(!err.empty() && err.find(b.word) != std::string::npos);
    }
    good_shapes(in);
    in[kValue] = shape({2, 30, 32});
    EXPECT(check_shapes(in, 5).find("value") != std::string::npos);
    good_shapes(in);
    in[kAttentionWeights] = shape({2, 7, 4, 6});
    EXPECT(check_shapes(in, 5).find("attention_weights") != std::string::npos);
    EXPECT(!check_shapes(in, 4).empty());
}

void test_codes_and_fields() {
    EXPECT(value_dtype_code(Type::kFloat) == MSDA_FLOAT32);
    EXPECT(value_dtype_code(Type::kHalf) == MSDA_FLOAT16);
    EXPECT(value_dtype_code(Type::kBFloat16) == MSDA_BFLOAT16);
    EXPECT(index_dtype_code(Type::kInt32) == MSDA_INT32);
    EXPECT(index_dtype_code(Type::kInt64) == MSDA_INT64);
    EXPECT(check_field("plugin_version").empty());
    EXPECT(check_field("plugin_namespace").empty());
    EXPECT(check_field("im2col_step").find("im2col_step") != std::string::npos);
    EXPECT(!check_field(nullptr).empty());
    EXPECT(std::string(LAYERFUSE_MSDA_PLUGIN_NAME) == "MSDeformAttn");
}

}  // namespace

int main() {
    test_formats();
    test_output_type();
    test_shapes();
    test_codes_and_fields();
    return msda_test::check_report();
}
