// Per-kernel counters of the SIMT emulator (summed over CTAs and launches), the facts the
// static GPU report shows next to registers and spills: how many barriers, tensor-core and
// warp-shuffle instructions a launch executes, how many shared-memory wavefronts its
// ldmatrix / st.shared / cp.async requests cost against the conflict-free ideal, and how many
// 32-byte sectors its global requests touch against the fewest that hold their bytes.
#pragma once
#include <cstdint>
#include <string>

namespace phi::simt {

#define PHI_SIMT_COUNTERS(X)                                                                       \
  X(launches) X(ctas) X(threads) X(barriers) X(mma) X(ldmatrix) X(ldmatrix_wavefronts) X(ldmatrix_ideal) \
  X(shfl) X(atomics) X(sts_requests) X(sts_wavefronts) X(sts_ideal) X(cp_async) X(cp_async_requests)     \
  X(cp_async_wavefronts) X(cp_async_ideal) X(gld_requests) X(gld_sectors) X(gld_ideal_sectors)            \
  X(gst_requests) X(gst_sectors) X(gst_ideal_sectors)

struct Counters {
#define PHI_SIMT_FIELD(name) uint64_t name = 0;
  PHI_SIMT_COUNTERS(PHI_SIMT_FIELD)
#undef PHI_SIMT_FIELD

  Counters& operator+=(const Counters& o) {
#define PHI_SIMT_ADD(name) name += o.name;
    PHI_SIMT_COUNTERS(PHI_SIMT_ADD)
#undef PHI_SIMT_ADD
    return *this;
  }

  std::string json() const {
    std::string s = "{";
#define PHI_SIMT_JSON(name) s += std::string(s.size() > 1 ? ", " : "") + "\"" #name "\": " + std::to_string(name);
    PHI_SIMT_COUNTERS(PHI_SIMT_JSON)
#undef PHI_SIMT_JSON
    return s + "}";
  }
};

// Every kernel's counters since the last reset, as {"kernel name": {"counter": n, ...}, ...}.
std::string stats_json();
void stats_reset();

}  // namespace phi::simt
