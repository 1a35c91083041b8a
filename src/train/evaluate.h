// Evaluation loss and perplexity over a tokenized data set, as the Trainer's evaluate() reports
// them: mean cross-entropy over all labelled tokens, perplexity = exp(mean loss).
#pragma once
#include <cstdint>
#include <vector>

#include "data/dataset.h"
#include "model/llama.h"

namespace lt {

struct EvalResult {
  double loss = 0;        // sum of token CE / labelled tokens
  double perplexity = 0;  // exp(loss)
  int64_t num_targets = 0, num_tokens = 0, num_rows = 0;
  double runtime_s = 0;
};

// Rows in dataset order, batch_size rows per micro-batch, forward only.
EvalResult evaluate_loss(LlamaModel& model, const std::vector<Example>& rows, int64_t batch_size);

}  // namespace lt
