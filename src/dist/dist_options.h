// What `longtune train` takes for distributed runs (flags in src/cli/dist_flags.cpp; a DeepSpeed
// config file or --fsdp fill the ZeRO fields, see src/dist/ds_config.h).
#pragma once
#include <cstdint>
#include <string>

namespace lt {

struct DistOptions {
  std::string deepspeed;             // --deepspeed ds_config.json ("" = none)
  std::string fsdp;                  // --fsdp: "", "full_shard" (ZeRO-3), "shard_grad_op" (ZeRO-2)
  bool fsdp_offload_params = false;  // --fsdp_offload_params: parameters + optimizer on host
  int zero_stage = 0;                // 0 (plain data parallel), 1, 2, 3
  bool offload_optimizer = false;    // ZeRO-Offload: optimizer state + update on the host
  bool offload_params = false;       // ZeRO-3: parameter shard on the host
  int64_t reduce_bucket_size = 500'000'000;          // elements per gradient reduction call
  int64_t allgather_bucket_size = 500'000'000;       // elements per parameter all-gather call
  int64_t stage3_prefetch_bucket_size = 50'000'000;  // > 0: prefetch the next layer (ZeRO-3)
  bool gather_16bit_weights_on_model_save = true;
  int64_t sequence_parallel_size = 1;  // DeepSpeed-Ulysses degree (src/dist/parallel.h)
  int64_t pipeline_parallel_size = 1;  // pipeline stages
  int64_t fpdt_chunk_size = 0;         // FPDT chunk tokens (0 = off)
  double dist_timeout = 600;           // seconds a collective may take before the job aborts
  bool log_all_ranks = false;          // every rank prints, not only rank 0
};

}  // namespace lt
