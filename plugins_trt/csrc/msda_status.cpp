// MSDeformAttn C ABI bookkeeping shared by libmsda_kernel and libmsda_host: status strings and the last error.
#include <string>

#include "msda_api.h"
#include "msda_dispatch.h"

namespace msda {

namespace {
thread_local std::string last_error;
}

void set_last_error(const std::string& message) { last_error = message; }

int fail(int status, const std::string& message) {
    set_last_error(message);
    return status;
}

}  // namespace msda

extern "C" {

MSDA_API int msda_abi_version(void) { return 1; }

MSDA_API const char* msda_status_string(int status) {
    switch (status) {
        case MSDA_STATUS_OK:
            return "ok";
        case MSDA_STATUS_INVALID_ARGUMENT:
            return "invalid argument";
        case MSDA_STATUS_UNSUPPORTED_DTYPE:
            return "unsupported dtype";
        case MSDA_STATUS_CUDA_ERROR:
            return "CUDA error";
        default:
            return "unknown status";
    }
}

MSDA_API const char* msda_last_error(void) { return msda::last_error.c_str(); }

}  // extern "C"
