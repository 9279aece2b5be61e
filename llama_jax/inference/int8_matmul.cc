// y[M, N] = (x[M, K] @ float(w[K, N])) * scale[N]: an int8 weight times float32 rows,
// the int8 values converted in registers, never written out as floats.
//
// Built and registered by llama_jax/inference/int8_cpu.py as an XLA FFI custom call.
// One thread; meant for few rows (decode), where reading the weight is the cost. The
// output columns are taken in tiles whose accumulators stay in the L1 cache while the
// weight streams through once.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 32;   // rows per pass over the weight
constexpr int64_t kTile = 256;  // output columns per pass

ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 1 || xd[1] != wd[0] ||
      sd[0] != wd[1]) {
    return ffi::Error::InvalidArgument(
        "int8_matmul: expected x [M, K], w [K, N] and scale [N]");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  static thread_local float acc[kRows * kTile];
  static thread_local float row[kTile];
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t mb = std::min(kRows, M - m0);
    for (int64_t n0 = 0; n0 < N; n0 += kTile) {
      const int64_t nb = std::min(kTile, N - n0);
      std::memset(acc, 0, sizeof(float) * mb * kTile);
      for (int64_t k = 0; k < K; ++k) {
        const int8_t* wk = wp + k * N + n0;
        if (mb == 1) {  // one row: convert and accumulate in one pass
          const float xv = xp[m0 * K + k];
          for (int64_t n = 0; n < nb; ++n) acc[n] += xv * static_cast<float>(wk[n]);
          continue;
        }
        for (int64_t n = 0; n < nb; ++n) row[n] = static_cast<float>(wk[n]);
        for (int64_t m = 0; m < mb; ++m) {
          const float xv = xp[(m0 + m) * K + k];
          float* a = acc + m * kTile;
          for (int64_t n = 0; n < nb; ++n) a[n] += xv * row[n];
        }
      }
      for (int64_t m = 0; m < mb; ++m) {
        float* out = yp + (m0 + m) * N + n0;
        const float* a = acc + m * kTile;
        for (int64_t n = 0; n < nb; ++n) out[n] = a[n] * sp[n0 + n];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
