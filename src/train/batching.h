// Turning dataset rows into micro-batches: rows concatenated, labels shifted within each row,
// documents kept apart (attention and positions), and the step schedule of an epoch.
#pragma once
#include <cstdint>
#include <vector>

#include "data/dataset.h"
#include "model/llama.h"

namespace lt {

// Concatenates rows into one micro-batch. targets[t] = labels[t+1] inside a row, ignored at a
// row's last token; position ids restart at every document (doc_ids) and every row.
MicroBatch make_micro_batch(const std::vector<const Example*>& rows);

// The micro-batches of one epoch: a seeded shuffle of the row order (seed + epoch), rows taken
// batch_size at a time (the last micro-batch may be smaller). Values index into the dataset.
std::vector<std::vector<int64_t>> epoch_micro_batches(int64_t num_rows, int64_t batch_size,
                                                      uint64_t seed, int64_t epoch,
                                                      bool shuffle = true);

// The most tokens any micro-batch can hold: the sum of the batch_size longest rows.
int64_t max_micro_batch_tokens(const std::vector<Example>& rows, int64_t batch_size);

}  // namespace lt
