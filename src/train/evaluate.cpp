// Evaluation loss and perplexity (see evaluate.h).
#include "train/evaluate.h"

#include <chrono>
#include <cmath>

#include "train/batching.h"

namespace lt {

EvalResult evaluate_loss(LlamaModel& model, const std::vector<Example>& rows, int64_t batch_size) {
  const auto t0 = std::chrono::steady_clock::now();
  EvalResult r;
  double loss_sum = 0;
  const auto batches =
      epoch_micro_batches(static_cast<int64_t>(rows.size()), batch_size, 0, 0, /*shuffle=*/false);
  for (const auto& b : batches) {
    std::vector<const Example*> ptrs;
    for (int64_t i : b) ptrs.push_back(&rows[i]);
    const MicroBatch mb = make_micro_batch(ptrs);
    r.num_targets += mb.num_targets();
    r.num_tokens += mb.num_tokens();
    loss_sum += model.forward_loss(mb);
  }
  r.num_rows = static_cast<int64_t>(rows.size());
  r.loss = r.num_targets > 0 ? loss_sum / static_cast<double>(r.num_targets) : 0.0;
  r.perplexity = std::exp(r.loss);
  r.runtime_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace lt
