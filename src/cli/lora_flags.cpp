// LoRA / QLoRA flags of `longtune train` (see lora_flags.h).
#include "cli/lora_flags.h"

#include "cli/flags.h"

namespace lt {

void add_lora_flags(CLI::App& app, LoraOptions* o) {
  add_bool_flag(app, "--use_peft_lora", &o->use_peft_lora,
                "train a LoRA adapter instead of the whole model (saved in PEFT format)");
  add_bool_flag(app, "--low_rank_training", &o->use_peft_lora,
                "alias of --use_peft_lora (LongLoRA)");
  app.add_option("--lora_r", o->r, "LoRA rank r (default 8)");
  app.add_option("--lora_alpha", o->alpha, "LoRA alpha; scale = alpha / r (default 16)");
  app.add_option("--lora_dropout", o->dropout, "dropout on the LoRA input (default 0.05)");
  app.add_option("--lora_target_modules", o->target_modules,
                 "comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or "
                 "all-linear (default q_proj,v_proj)");
  add_bool_flag(app, "--use_rslora", &o->use_rslora, "rank-stabilised scale alpha / sqrt(r)");
  app.add_option("--trainable_params", o->trainable_params,
                 "base tensors that also train with LoRA: embed, norm or embed,norm (LongLoRA)");
  add_bool_flag(app, "--load_in_4bit", &o->load_in_4bit,
                "QLoRA: frozen base projections stored in NF4 (implies --use_peft_lora)");
  add_bool_flag(app, "--use_4bit_quantization", &o->load_in_4bit, "alias of --load_in_4bit");
  app.add_option("--adapter_name_or_path", o->adapter_name_or_path,
                 "continue training this PEFT adapter folder (its r, alpha and targets are used)");
}

}  // namespace lt
