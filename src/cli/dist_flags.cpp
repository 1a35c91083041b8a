// Flags of distributed runs (see dist_flags.h); launch with mpirun / srun, one process per rank.
#include "cli/dist_flags.h"

#include "cli/flags.h"

namespace lt {

void add_dist_flags(CLI::App& app, DistOptions* d) {
  app.add_option("--deepspeed", d->deepspeed,
                 "DeepSpeed config JSON (zero_optimization, optimizer, scheduler; \"auto\" "
                 "values are filled from the flags)");
  app.add_option("--fsdp", d->fsdp, "full_shard (ZeRO-3) or shard_grad_op (ZeRO-2), + offload");
  add_bool_flag(app, "--fsdp_offload_params", &d->fsdp_offload_params,
                "FSDP CPU offload: parameter shard and optimizer on the host");
  app.add_option("--sequence_parallel_size", d->sequence_parallel_size,
                 "DeepSpeed-Ulysses degree: ranks that share each sequence (attention heads "
                 "split among them; must divide the heads and kv heads)")
      ->check(CLI::PositiveNumber);
  app.add_option("--pipeline_parallel_size", d->pipeline_parallel_size,
                 "pipeline stages: decoder layers split over this many ranks, 1F1B schedule over "
                 "the micro-batches of a step (ZeRO stage 0 or 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--fpdt_chunk_size", d->fpdt_chunk_size,
                 "FPDT: attention over chunks of this many tokens of the whole sequence, q/k/v "
                 "kept in host memory (a multiple of --sequence_parallel_size; 0 = off)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--dist_timeout", d->dist_timeout,
                 "seconds a collective may wait before the whole job is aborted (default 600)")
      ->check(CLI::PositiveNumber);
  add_bool_flag(app, "--log_all_ranks", &d->log_all_ranks,
                "every rank prints its log (default: rank 0 only)");
}

}  // namespace lt
