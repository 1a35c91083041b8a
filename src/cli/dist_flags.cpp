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
                 "DeepSpeed-Ulysses degree (not implemented yet: must be 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--pipeline_parallel_size", d->pipeline_parallel_size,
                 "pipeline stages (not implemented yet: must be 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--fpdt_chunk_size", d->fpdt_chunk_size,
                 "FPDT chunk in tokens (not implemented yet: must be 0)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--dist_timeout", d->dist_timeout,
                 "seconds a collective may wait before the whole job is aborted (default 600)")
      ->check(CLI::PositiveNumber);
  add_bool_flag(app, "--log_all_ranks", &d->log_all_ranks,
                "every rank prints its log (default: rank 0 only)");
}

}  // namespace lt
