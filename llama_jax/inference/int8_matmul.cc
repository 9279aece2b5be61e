// y[M, N] = (x[M, K] @ float(w[K, N])) * scale[N]: an int8 weight times float32 rows,
// the int8 values converted in registers, never written out as floats.
//
// Built and registered by llama_jax/inference/int8_cpu.py as an XLA FFI custom call.
// Meant for few rows (decode), where reading the weight is the cost. The output columns
// are taken in tiles whose accumulators stay in the L1 cache while the weight streams
// through once. The tiles are shared out over XLA's intra-op thread pool: the calling
// thread and helpers scheduled on the pool take tiles from one counter until none is
// left, and the call returns once every taken tile is done. The caller never waits for
// a tile nobody has started, so helpers that start late (the pool busy with other
// products) find nothing left and return without touching the buffers.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 32;   // rows per pass over the weight
constexpr int64_t kTile = 128;  // output columns per tile
// Each thread gets at least this many weight bytes: for less, waking a helper costs
// more than it saves (a product under 256 KiB runs on the calling thread alone).
constexpr int64_t kBytesPerThread = 128 * 1024;

struct Product {
  const float* x;
  const int8_t* w;
  const float* scale;
  float* y;
  int64_t M, K, N;
};

// Rows m0 .. m0 + kRows - 1 (at most) by output columns n0 .. n0 + kTile - 1 (at most).
void Tile(const Product& p, int64_t m0, int64_t n0) {
  const int64_t mb = std::min(kRows, p.M - m0);
  const int64_t nb = std::min(kTile, p.N - n0);
  float acc[kRows * kTile];
  float row[kTile];
  std::memset(acc, 0, sizeof(float) * mb * kTile);
  for (int64_t k = 0; k < p.K; ++k) {
    const int8_t* wk = p.w + k * p.N + n0;
    if (mb == 1) {  // one row: convert and accumulate in one pass
      const float xv = p.x[m0 * p.K + k];
      for (int64_t n = 0; n < nb; ++n) acc[n] += xv * static_cast<float>(wk[n]);
      continue;
    }
    for (int64_t n = 0; n < nb; ++n) row[n] = static_cast<float>(wk[n]);
    for (int64_t m = 0; m < mb; ++m) {
      const float xv = p.x[(m0 + m) * p.K + k];
      float* a = acc + m * kTile;
      for (int64_t n = 0; n < nb; ++n) a[n] += xv * row[n];
    }
  }
  for (int64_t m = 0; m < mb; ++m) {
    float* out = p.y + (m0 + m) * p.N + n0;
    const float* a = acc + m * kTile;
    for (int64_t n = 0; n < nb; ++n) out[n] = a[n] * p.scale[n0 + n];
  }
}

// The tiles of one call and how far they have got.
struct Work {
  Product p;
  int64_t col_tiles, tiles;
  std::atomic<int64_t> next{0};  // the next tile to take
  std::atomic<int64_t> done{0};  // tiles finished
};

void TakeTiles(Work& work) {
  for (int64_t t; (t = work.next.fetch_add(1, std::memory_order_relaxed)) < work.tiles;) {
    Tile(work.p, (t / work.col_tiles) * kRows, (t % work.col_tiles) * kTile);
    work.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 1 || xd[1] != wd[0] ||
      sd[0] != wd[1]) {
    return ffi::Error::InvalidArgument(
        "int8_matmul: expected x [M, K], w [K, N] and scale [N]");
  }
  auto work = std::make_shared<Work>();
  work->p = {x.typed_data(), w.typed_data(), scale.typed_data(), y->typed_data(),
             xd[0], xd[1], wd[1]};
  work->col_tiles = (wd[1] + kTile - 1) / kTile;
  work->tiles = ((xd[0] + kRows - 1) / kRows) * work->col_tiles;
  const int64_t threads =
      std::min({pool.num_threads(), work->tiles, wd[0] * wd[1] / kBytesPerThread});
  const int64_t helpers = std::max<int64_t>(threads - 1, 0);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { TakeTiles(*work); });
  TakeTiles(*work);
  // Every tile is taken; wait for those still being computed by a helper.
  while (work->done.load(std::memory_order_acquire) < work->tiles) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
