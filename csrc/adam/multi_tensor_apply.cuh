// Multi-tensor apply: one kernel launch updates many tensors.
//
// The host packs, into the kernel's by-value argument (no device allocation, no copy), the
// addresses of up to kMaxTensors tensors for each of kLists lists and, for each of up to
// kMaxBlocks thread blocks, which tensor and which chunk of it that block processes. When
// either table fills up, the host launches and starts a new table. Chunks are kChunk elements;
// element indices are 64-bit, so tensors above 2^31 elements are fine.
// Argument size: 6 lists x 24 tensors x 8 B + 24 x 8 B + 320 x 5 B ~ 3.0 KB < 4 KB (the
// classic kernel-parameter limit, so this works on every toolkit).
#pragma once
#include <cstdint>

namespace phi {

constexpr int kMtaLists = 6;        // params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, master
constexpr int kMtaMaxTensors = 24;
constexpr int kMtaMaxBlocks = 320;
constexpr int64_t kMtaChunk = 65536;

struct Mta_table {
  void* addrs[kMtaLists][kMtaMaxTensors];
  int64_t numels[kMtaMaxTensors];
  unsigned char block_tensor[kMtaMaxBlocks];
  int32_t block_chunk[kMtaMaxBlocks];
};

// Calls launch(table, n_blocks) as often as needed to cover every chunk of every tensor.
// lists[k][t] is tensor t's address in list k (nullptr for an unused list).
template <typename Launch>
void multi_tensor_apply(int n_tensors, void* const* const* lists, const int64_t* numels, Launch&& launch) {
  Mta_table table{};
  int n_in_table = 0, n_blocks = 0;
  for (int t = 0; t < n_tensors; ++t) {
    if (numels[t] == 0) continue;
    for (int k = 0; k < kMtaLists; ++k) table.addrs[k][n_in_table] = lists[k] ? lists[k][t] : nullptr;
    table.numels[n_in_table] = numels[t];
    const int64_t n_chunks = (numels[t] + kMtaChunk - 1) / kMtaChunk;
    for (int64_t c = 0; c < n_chunks; ++c) {
      table.block_tensor[n_blocks] = static_cast<unsigned char>(n_in_table);
      table.block_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == n_chunks - 1;
      const bool blocks_full = n_blocks == kMtaMaxBlocks;
      const bool tensors_full = n_in_table + 1 == kMtaMaxTensors && last_chunk;
      if (blocks_full || tensors_full) {
        launch(table, n_blocks);
        n_blocks = 0;
        if (last_chunk) {
          n_in_table = -1;  // the tensor is done: start the next table empty
        } else {
          // The tensor continues in the next table, as its entry 0.
          for (int k = 0; k < kMtaLists; ++k) table.addrs[k][0] = table.addrs[k][n_in_table];
          table.numels[0] = table.numels[n_in_table];
          n_in_table = 0;
          continue;
        }
      }
    }
    ++n_in_table;
  }
  if (n_blocks > 0) launch(table, n_blocks);
}

}  // namespace phi
