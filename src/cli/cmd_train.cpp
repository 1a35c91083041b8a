// `longtune train`: flags named as Hugging Face TrainingArguments.
#include "cli/commands.h"
#include "cli/dist_flags.h"
#include "cli/flags.h"
#include "cli/lora_flags.h"
#include "train/trainer.h"

namespace lt {

int cmd_train(int argc, char** argv) {
  TrainOptions o;
  CLI::App app{"Fine-tune a Hugging Face Llama-family model", "longtune train"};
  app.option_defaults()->always_capture_default();  // defaults go to training_args.json
  std::string model, data, out, tokenizer;
  app.add_option("--model_name_or_path", model, "Hugging Face model folder")->required();
  app.add_option("--data_path", data, "training data (json, jsonl, txt)")->required();
  app.add_option("--output_dir", out, "where the trained model is written")->required();
  app.add_option("--tokenizer", tokenizer, "tokenizer.json or folder (default: the model's)");
  app.add_option("--max_steps", o.max_steps, "total optimizer steps (overrides epochs)");
  app.add_option("--num_train_epochs", o.num_train_epochs, "epochs")->check(CLI::NonNegativeNumber);
  app.add_option("--per_device_train_batch_size", o.per_device_train_batch_size,
                 "rows per micro-batch");
  app.add_option("--gradient_accumulation_steps", o.gradient_accumulation_steps,
                 "micro-batches per step");
  app.add_option("--learning_rate", o.optimizer.learning_rate, "peak learning rate");
  app.add_option("--weight_decay", o.optimizer.weight_decay, "AdamW weight decay");
  app.add_option("--adam_beta1", o.optimizer.beta1, "AdamW beta1")->check(CLI::Range(0.0, 1.0));
  app.add_option("--adam_beta2", o.optimizer.beta2, "AdamW beta2")->check(CLI::Range(0.0, 1.0));
  app.add_option("--adam_epsilon", o.optimizer.eps, "AdamW epsilon")->check(CLI::NonNegativeNumber);
  app.add_option("--max_grad_norm", o.optimizer.max_grad_norm, "global-norm clipping (0 = off)");
  app.add_option("--warmup_steps", o.warmup_steps, "warmup steps")->check(CLI::NonNegativeNumber);
  app.add_option("--warmup_ratio", o.warmup_ratio, "warmup as a fraction of the steps");
  app.add_option("--lr_scheduler_type", o.lr_scheduler_type,
                 "constant, constant_with_warmup, linear, cosine");
  app.add_option("--model_max_length", o.model_max_length, "longest row in tokens");
  app.add_option("--seed", o.seed, "random seed");
  app.add_option("--logging_steps", o.logging_steps, "log every N steps");
  add_bool_flag(app, "--bf16", &o.bf16,
                "bf16 training with f32 master weights: the residual stream and checkpoints "
                "in bf16 (every device), LoRA's frozen projections in bf16, bf16 tensor-core "
                "GEMMs with f32 accumulation (CUDA; the CPU multiplies in f32)");
  add_bool_flag(app, "--overwrite_output_dir", &o.overwrite_output_dir,
                "reuse a non-empty output_dir");
  app.add_option("--device", o.device,
                 "auto (cuda when a GPU is present), cpu, cuda or cpu-guarded");
  app.add_option("--mini_sequence", o.mini_sequence, "MLP / LM-head chunks: M or auto");
  add_bool_flag(app, "--gradient_checkpointing", &o.gradient_checkpointing,
                "keep only layer inputs; recompute in backward");
  app.add_option("--recompute_granularity", o.recompute_granularity,
                 "full (recompute each checkpointed layer whole) or selective (keep every "
                 "layer's attention output: the recompute skips attention; more memory)");
  add_bool_flag(app, "--offload_activations", &o.offload_activations,
                "keep layer checkpoints off the device: a memory-mapped file on the CPU, pinned "
                "host memory on a GPU (implies checkpointing)");
  app.add_option("--host_memory_budget", o.host_memory_budget,
                 "GPU runs: host memory the offloaded buffers may pin, e.g. 200GiB, or auto (the "
                 "memory available when the run starts)");
  add_bool_flag(app, "--use_flash_attn", &o.use_flash_attn, "tiled attention (default True)");
  add_bool_flag(app, "--full_determinism", &o.full_determinism,
                "bit-identical results run to run: CUDA kernels without atomics (attention "
                "backward's dQ in a second kernel, embedding backward by column; slower). The "
                "CPU is always deterministic");
  app.add_option("--profile_step", o.profile_step,
                 "time every op of this step (1-based) where it runs (GPU: CUDA events) and print "
                 "where the step's time went; 0: never")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--dataset_format", o.dataset_format,
                 "auto, alpaca, messages, sharegpt, completion, text, tokenized");
  add_bool_flag(app, "--train_on_inputs", &o.train_on_inputs, "train prompt tokens too");
  add_bool_flag(app, "--packing", &o.packing, "pack rows into model_max_length sequences");
  app.add_option("--chat_template", o.chat_template, "built-in template name or a file");
  std::string cache_dir;
  app.add_option("--max_train_samples", o.max_train_samples,
                 "read only the first N rows of --data_path (0: all)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--cache_dir", cache_dir,
                 "tokenized-data cache (default: $LONGTUNE_CACHE or ~/.cache/longtune)");
  app.add_option("--save_dtype", o.save_dtype, "f32, bf16 or f16 (default: as loaded)");
  app.add_option("--max_shard_size", o.max_shard_size,
                 "largest model.safetensors shard, like 5GB or 500MiB (default 50GB)");
  add_lora_flags(app, &o.lora);
  add_dist_flags(app, &o.dist);
  // --- trainer product: config file, evaluation, checkpoints, tracking (trainer_loop.h) ---
  std::string config_file;
  app.add_option("--config", config_file,
                 "YAML or JSON file of these flags (flags given here override it)");
  std::string eval_data;
  app.add_option("--eval_data_path", eval_data, "evaluation data (eval loss and perplexity)");
  app.add_option("--per_device_eval_batch_size", o.per_device_eval_batch_size,
                 "rows per evaluation micro-batch");
  app.add_option("--evaluation_strategy,--eval_strategy", o.evaluation_strategy,
                 "no, steps or epoch");
  app.add_option("--eval_steps", o.eval_steps, "evaluate every N steps (default: logging_steps)");
  app.add_option("--save_strategy", o.save_strategy, "no, steps or epoch");
  app.add_option("--save_steps", o.save_steps, "write output_dir/checkpoint-N every N steps");
  app.add_option("--save_total_limit", o.save_total_limit,
                 "keep at most this many checkpoints, deleting the oldest (0: all)");
  app.add_option("--resume_from_checkpoint", o.resume_from_checkpoint,
                 "a checkpoint-N folder, or latest (the newest in output_dir)");
  app.add_option("--report_to", o.report_to, "tensorboard, mlflow, none or all (comma list)");
  app.add_option("--run_name", o.run_name, "MLflow run name (default: output_dir's name)");
  std::string logging_dir;
  app.add_option("--logging_dir", logging_dir,
                 "TensorBoard folder (default: output_dir/runs/<time>_<host>)");
  add_bool_flag(app, "--disable_tqdm", &o.disable_tqdm, "plain log lines even on a terminal");
  // Hugging Face / LongLoRA flags that have no meaning here: accepted with a note.
  add_ignored_flag(app, "--tf32", "the CPU backend computes in f32; CUDA picks its own math mode");
  add_ignored_flag(app, "--dataloader_num_workers", "data is tokenized up front");
  add_ignored_flag(app, "--ddp_find_unused_parameters", "every parameter gets a gradient");
  add_ignored_flag(app, "--remove_unused_columns", "only input_ids and labels are read");
  add_ignored_flag(app, "--local_rank", "set by launchers; ranks come from the MPI environment");
  add_ignored_flag(app, "--group_by_length", "rows keep the seeded shuffle order");
  add_ignored_flag(app, "--torch_compile", "there is no PyTorch to compile");
  // --- end trainer product flags ---
  if (!parse_flags_with_config(app, argc, argv)) return 0;
  o.eval_data_path = eval_data;
  o.logging_dir = logging_dir;
  for (const CLI::Option* opt : app.get_options()) {
    if (opt->get_lnames().empty() || opt->get_lnames()[0] == "help" ||
        opt->get_lnames()[0] == "config")
      continue;
    std::string v;
    for (const auto& r : opt->results()) v += (v.empty() ? "" : ",") + r;
    if (opt->count() == 0) v = opt->get_default_str();
    if (opt->get_description().rfind("accepted, not used", 0) == 0 && opt->count() == 0) continue;
    o.flag_values[opt->get_lnames()[0]] = v;
  }
  o.model_name_or_path = model;
  o.data_path = data;
  o.output_dir = out;
  o.tokenizer = tokenizer;
  o.cache_dir = cache_dir;
  run_train(o);
  return 0;
}

}  // namespace lt
