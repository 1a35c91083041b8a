// Karpathy's llama2.c formats: the model checkpoint (7 int32 header + f32 weights) and the
// tokenizer (tok*.bin), and their conversion into a Hugging Face Llama model folder.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/config.h"

namespace lt {

// A llama2.c checkpoint, weights already in Hugging Face layout (q/k rows permuted to
// rotate-half, see llama2c_permute_rope_rows) and named as in a Llama safetensors file.
struct Llama2cModel {
  ModelConfig config;  // LlamaForCausalLM, eps 1e-5, rope_theta 10000, mpe = seq_len
  std::vector<float> params;  // ParamTable(config) layout
};

// Reads a llama2.c checkpoint (legacy version-0 export: header dim, hidden_dim, n_layers,
// n_heads, n_kv_heads, vocab_size (< 0: untied classifier), seq_len; then token_embedding
// (V,D), rms_att (L,D), wq (L,D,D), wk (L,KVH*HD,D), wv, wo (L,D,D), rms_ffn (L,D),
// w1 (L,F,D), w2 (L,D,F), w3 (L,F,D), rms_final (D), freq_cis real/imag (seq_len,HD/2) each,
// classifier (V,D) when untied). UserError names the file when it is truncated, has trailing
// bytes or a header inconsistent with its size.
Llama2cModel read_llama2c_checkpoint(const std::filesystem::path& path);

// llama2.c rotates interleaved pairs (x[2i], x[2i+1]); Hugging Face rotates halves
// (x[i], x[i+HD/2]). Reorders the rows of w (heads*HD, cols) in place as transformers'
// convert_llama_weights_to_hf.py `permute` does: per head, new row h*HD/2 + i = old row 2i + h.
void llama2c_permute_rope_rows(float* w, int64_t heads, int64_t head_dim, int64_t cols);

// One token of a llama2.c tokenizer file, as stored (spaces as ' ', BOS as "\n<s>\n").
struct Llama2cToken {
  std::string piece;
  float score = 0;
};
// Reads tok*.bin: int32 max_token_length, then per token float score, int32 len, len bytes.
// vocab_size tokens are expected (the model's); UserError names the file otherwise.
std::vector<Llama2cToken> read_llama2c_tokenizer(const std::filesystem::path& path,
                                                 int64_t vocab_size);

// tokenizer.json (SentencePiece-style BPE with byte fallback, as transformers' LlamaConverter
// writes it: vocab in id order, merges = every split of a piece into two vocabulary pieces,
// ranked by the merged piece's id, i.e. by score) and tokenizer_config.json.
nlohmann::ordered_json llama2c_tokenizer_json(const std::vector<Llama2cToken>& tokens);
nlohmann::json llama2c_tokenizer_config_json();

// The whole conversion: writes config.json, model.safetensors, tokenizer.json,
// tokenizer_config.json and generation_config.json into output_dir.
void convert_llama2c(const std::filesystem::path& checkpoint,
                     const std::filesystem::path& tokenizer,
                     const std::filesystem::path& output_dir,
                     size_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace lt
