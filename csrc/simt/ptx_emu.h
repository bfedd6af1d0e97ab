// The SIMT emulator's versions of the instruction wrappers of common/ptx_sm80.cuh: same names,
// same signatures, executed by the emulator runtime (runtime.cpp) with the PTX ISA's semantics
// (fragment ownership of mma.m16n8k16 and ldmatrix .x4 / .trans, cp.async groups that land
// only when waited for) and with every shared and global access checked.
#pragma once
#include "simt/simt.h"

namespace phi {

inline uint32_t smem_addr(const void* p) { return simt::cvta_to_shared(p); }

inline void cp_async_16(uint32_t dst, const void* src, bool valid) { simt::cp_async_16(dst, src, valid); }
inline void cp_async_commit() { simt::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  simt::cp_async_wait(kPending);
}
inline void cp_async_wait_all() { cp_async_wait<0>(); }

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { simt::ldmatrix_x4(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { simt::ldmatrix_x4(r, addr, true); }

template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16 mma");
  simt::mma_m16n8k16(c, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
}

inline void st_shared_b32(uint32_t addr, uint32_t v) { simt::st_shared_b32(addr, v); }

template <typename T>
inline T ld_global(const T* p) {
  return *static_cast<const T*>(simt::checked_global(p, sizeof(T), false));
}
template <typename T>
inline void st_global(T* p, T v) {
  *static_cast<T*>(const_cast<void*>(simt::checked_global(p, sizeof(T), true))) = v;
}
inline void atomic_add_global(float* p, float v) { simt::atomic_add(p, v); }

}  // namespace phi
