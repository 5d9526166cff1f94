// Minimal check harness shared by the C++ plugin tests: EXPECT(cond) records a check and prints the failed ones;
// check_report() prints the summary line and gives the process exit code (1 if any check failed, else 0).
#pragma once

#include <cstdio>

namespace msda_test {

inline int checks = 0;
inline int failures = 0;

inline void expect(bool ok, const char* what, int line) {
    ++checks;
    if (!ok) {
        ++failures;
        std::printf("FAILED line %d: %s\n", line, what);
    }
}

inline int check_report() {
    if (failures != 0) {
        std::printf("%d of %d checks failed\n", failures, checks);
        return 1;
    }
    std::printf("%d checks passed\n", checks);
    return 0;
}

}  // namespace msda_test

#define EXPECT(cond) ::msda_test::expect((cond), #cond, __LINE__)
