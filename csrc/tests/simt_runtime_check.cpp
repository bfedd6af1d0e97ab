// Unit checks of the SIMT emulator's runtime (csrc/simt) with small kernels written for the
// purpose: shuffle semantics, barriers across warps, float atomics from many CTAs, and every
// error path (deadlock, warp divergence, launch limits, shared-memory opt-in, out-of-bounds
// global and shared accesses, races). Built and run by tests/test_simt_mutations.py:
//   g++ -std=c++20 -O1 -fopenmp -DPHI_SIMT -Icsrc -I<cuda>/include csrc/simt/runtime.cpp \
//       csrc/tests/simt_runtime_check.cpp -o simt_runtime_check && ./simt_runtime_check
// Prints one line per check; exit code = number of failed checks.
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/cuda_runtime.cuh"
#include "common/ptx.cuh"

namespace {

int failures = 0;

void check(bool ok, const char* what, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail.empty() ? "" : ": ", detail.c_str());
  failures += !ok;
}

// Runs `launch`; returns the emulator's error message ("" when it succeeded).
std::string error_of(const std::function<void()>& launch) {
  try {
    launch();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

}  // namespace

// The kernels live in phi::flash: the emulator's dynamic shared memory is the
// `extern __shared__ unsigned char smem[]` of that namespace (csrc/simt/runtime.cpp).
namespace phi::flash {

// out[t] = value of lane (lane ^ 5) and of lane 7, per warp; then a block-wide sum through
// shared memory behind a barrier.
__global__ void shuffle_kernel(int* out_xor, int* out_idx, float* out_sum) {
  const int t = threadIdx.x, lane = t & 31;
  phi::st_global(out_xor + t, __shfl_xor_sync(0xffffffffu, t * 10, 5));
  phi::st_global(out_idx + t, __shfl_sync(0xffffffffu, t * 10, 7));
  extern __shared__ unsigned char smem[];
  phi::st_shared_b32(phi::smem_addr(smem + 4 * t), uint32_t(t));
  __syncthreads();
  if (t == 0) {
    float s = 0;
    for (int i = 0; i < int(blockDim.x); ++i) {
      uint32_t v;
      std::memcpy(&v, smem + 4 * i, 4);  // plain read: allowed after the barrier
      s += float(v);
    }
    phi::st_global(out_sum, s);
  }
  (void)lane;
}

__global__ void atomic_kernel(float* total) { phi::atomic_add_global(total, 1.0f); }

__global__ void deadlock_kernel(int* out) {
  // Lanes 0-15 shuffle (waiting for lanes 16-31) while lanes 16-31 wait at a barrier for them.
  if ((threadIdx.x & 31) < 16) phi::st_global(out, __shfl_xor_sync(0xffffffffu, 1, 1));
  else __syncthreads();
}

__global__ void divergent_kernel(int* out) {
  // Lanes 0-15 shuffle while lanes 16-31 reach an ldmatrix: two different .sync instructions.
  extern __shared__ unsigned char smem[];
  uint32_t r[4];
  if ((threadIdx.x & 31) < 16) phi::st_global(out, __shfl_xor_sync(0xffffffffu, 1, 1));
  else phi::ldmatrix_x4(r, phi::smem_addr(smem + 16 * (threadIdx.x & 31)));
}

__global__ void store_kernel(float* p, int index) { phi::st_global(p + index, 1.0f); }

__global__ void smem_kernel(int offset) {
  extern __shared__ unsigned char smem[];
  if (threadIdx.x == 0) phi::st_shared_b32(phi::smem_addr(smem + offset), 1u);
}

__global__ void race_kernel(int barrier) {
  extern __shared__ unsigned char smem[];
  if (threadIdx.x == 0) phi::st_shared_b32(phi::smem_addr(smem), 1u);
  if (barrier) __syncthreads();
  if (threadIdx.x == 33) phi::st_shared_b32(phi::smem_addr(smem), 2u);
}

__global__ void noop_kernel() {}

}  // namespace phi::flash

int main() {
  using namespace phi::flash;
  using phi::launch_kernel;
  phi::simt::Memory_scope scope;

  {  // shuffles and a barrier across 4 warps
    std::vector<int> xr(128), ix(128);
    float sum = 0;
    phi::simt::register_region(xr.data(), xr.size() * 4, "out_xor");
    phi::simt::register_region(ix.data(), ix.size() * 4, "out_idx");
    phi::simt::register_region(&sum, 4, "out_sum");
    const std::string err = error_of(
        [&] { launch_kernel("shuffle_kernel", shuffle_kernel, dim3(1), dim3(128), 512, nullptr, xr.data(), ix.data(), &sum); });
    bool ok = err.empty() && sum == 127 * 128 / 2;
    for (int t = 0; t < 128; ++t) ok = ok && xr[t] == ((t & ~31) | ((t & 31) ^ 5)) * 10 && ix[t] == ((t & ~31) | 7) * 10;
    check(ok, "shfl.xor / shfl.idx per warp, barrier, shared stores", err);
  }
  {  // float atomics from 64 CTAs running on several OS threads
    float total = 0;
    phi::simt::register_region(&total, 4, "total");
    const std::string err =
        error_of([&] { launch_kernel("atomic_kernel", atomic_kernel, dim3(64), dim3(256), 0, nullptr, &total); });
    check(err.empty() && total == 64 * 256, "atomicAdd from 64 CTAs x 256 threads", err);
  }
  {
    int out = 0;
    phi::simt::register_region(&out, 4, "out");
    const std::string dead =
        error_of([&] { launch_kernel("deadlock_kernel", deadlock_kernel, dim3(1), dim3(64), 0, nullptr, &out); });
    check(contains(dead, "deadlock"), "half a warp at a shuffle, half at a barrier: deadlock", dead);
    const std::string div =
        error_of([&] { launch_kernel("divergent_kernel", divergent_kernel, dim3(1), dim3(32), 512, nullptr, &out); });
    check(contains(div, "divergence"), "half a warp at a shuffle, half at an ldmatrix: divergence", div);
  }
  {
    std::vector<float> buf(10);
    phi::simt::register_region(buf.data(), buf.size() * 4, "buf");
    const std::string ok = error_of([&] { launch_kernel("store_kernel", store_kernel, dim3(1), dim3(32), 0, nullptr, buf.data(), 9); });
    const std::string err =
        error_of([&] { launch_kernel("store_kernel", store_kernel, dim3(1), dim3(32), 0, nullptr, buf.data(), 10); });
    check(ok.empty() && contains(err, "outside every tensor") && contains(err, "buf"),
          "a global store one element past a tensor is refused, naming it", err);
    check(buf[9] == 1.0f, "the in-bounds store landed");
  }
  {
    const std::string ok = error_of([&] { launch_kernel("smem_kernel", smem_kernel, dim3(1), dim3(32), 1024, nullptr, 1020); });
    const std::string err =
        error_of([&] { launch_kernel("smem_kernel", smem_kernel, dim3(1), dim3(32), 1024, nullptr, 1024); });
    check(ok.empty() && contains(err, "past the 1024 bytes"), "shared memory is exactly the launch's size", err);
    const std::string mis = error_of([&] { launch_kernel("smem_kernel", smem_kernel, dim3(1), dim3(32), 1024, nullptr, 2); });
    check(contains(mis, "aligned"), "a misaligned st.shared.b32 is refused", mis);
  }
  {
    const std::string err = error_of([&] { launch_kernel("race_kernel", race_kernel, dim3(1), dim3(64), 16, nullptr, 0); });
    const std::string ok = error_of([&] { launch_kernel("race_kernel", race_kernel, dim3(1), dim3(64), 16, nullptr, 1); });
    check(contains(err, "race") && contains(err, "thread 33") && contains(err, "thread 0") && ok.empty(),
          "two writers of a word between barriers race; with a barrier they don't", err);
  }
  {
    const std::string big = error_of([&] { launch_kernel("noop_kernel", noop_kernel, dim3(1), dim3(1025), 0, nullptr); });
    check(contains(big, "1024"), "a block of 1025 threads is refused", big);
    const std::string gy = error_of([&] { launch_kernel("noop_kernel", noop_kernel, dim3(1, 65536), dim3(32), 0, nullptr); });
    check(contains(gy, "65535"), "grid.y of 65536 is refused", gy);
    const std::string empty = error_of([&] { launch_kernel("noop_kernel", noop_kernel, dim3(0), dim3(32), 0, nullptr); });
    check(contains(empty, "invalid configuration"), "an empty grid is refused", empty);
    const std::string smem = error_of([&] { launch_kernel("noop_kernel", noop_kernel, dim3(1), dim3(32), 64 * 1024, nullptr); });
    check(contains(smem, "48 KiB unless raised"), "64 KiB of dynamic shared memory needs the opt-in", smem);
    check(phi::rt::cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) ==
              cudaSuccess,
          "cudaFuncSetAttribute(64 KiB) on sm_80");
    const std::string raised =
        error_of([&] { launch_kernel("noop_kernel", noop_kernel, dim3(1), dim3(32), 64 * 1024, nullptr); });
    check(raised.empty(), "the opt-in raises the limit", raised);
    check(phi::rt::cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024) ==
              cudaErrorInvalidValue,
          "cudaFuncSetAttribute beyond sm_80's 163 KiB fails");
  }
  std::printf("%d failed\n", failures);
  return failures;
}
