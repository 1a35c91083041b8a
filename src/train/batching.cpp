// Micro-batch construction and epoch ordering.
#include "train/batching.h"

#include <algorithm>
#include <numeric>
#include <random>

#include "core/check.h"

namespace lt {

MicroBatch make_micro_batch(const std::vector<const Example*>& rows) {
  MicroBatch mb;
  mb.row_start.push_back(0);
  int32_t doc_base = 0;
  for (const Example* e : rows) {
    const size_t n = e->input_ids.size();
    LT_CHECK(e->labels.empty() || e->labels.size() == n);
    LT_CHECK(e->doc_ids.empty() || e->doc_ids.size() == n);
    int32_t pos = 0, prev_doc = -1, max_doc = 0;
    for (size_t t = 0; t < n; ++t) {
      const int32_t doc = e->doc_ids.empty() ? 0 : e->doc_ids[t];
      if (t > 0 && doc != prev_doc) pos = 0;
      prev_doc = doc;
      max_doc = std::max(max_doc, doc);
      mb.ids.push_back(e->input_ids[t]);
      mb.pos.push_back(pos++);
      mb.docs.push_back(doc_base + doc);
      const int32_t next_label =
          t + 1 < n ? (e->labels.empty() ? e->input_ids[t + 1] : e->labels[t + 1]) : kIgnoreIndex;
      mb.targets.push_back(next_label);
    }
    doc_base += max_doc + 1;
    mb.row_start.push_back(static_cast<int64_t>(mb.ids.size()));
  }
  return mb;
}

std::vector<std::vector<int64_t>> epoch_micro_batches(int64_t num_rows, int64_t batch_size,
                                                      uint64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(num_rows);
  std::iota(order.begin(), order.end(), 0);
  if (shuffle) {
    std::mt19937_64 rng(seed * 1000003ull + static_cast<uint64_t>(epoch));
    std::shuffle(order.begin(), order.end(), rng);
  }
  std::vector<std::vector<int64_t>> out;
  for (int64_t i = 0; i < num_rows; i += batch_size)
    out.emplace_back(order.begin() + i, order.begin() + std::min(num_rows, i + batch_size));
  return out;
}

int64_t max_micro_batch_tokens(const std::vector<Example>& rows, int64_t batch_size) {
  std::vector<int64_t> lens;
  for (const auto& r : rows) lens.push_back(static_cast<int64_t>(r.input_ids.size()));
  std::sort(lens.begin(), lens.end(), std::greater<>());
  int64_t s = 0;
  for (int64_t i = 0; i < batch_size && i < static_cast<int64_t>(lens.size()); ++i) s += lens[i];
  return s;
}

}  // namespace lt
