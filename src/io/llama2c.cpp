// llama2.c checkpoint and tokenizer readers and the conversion to a Hugging Face folder.
#include "io/llama2c.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <unordered_map>

#include "core/check.h"
#include "core/error.h"
#include "io/atomic_file.h"
#include "model/model_io.h"
#include "model/params.h"

namespace lt {

namespace fs = std::filesystem;

namespace {

// Reads little-endian values from a byte buffer, failing with the file name when short.
class ByteReader {
 public:
  ByteReader(const std::string& bytes, const fs::path& path) : bytes_(bytes), path_(path) {}
  template <typename T>
  T get(const char* what) {
    T v;
    need(sizeof(T), what);
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string get_bytes(size_t n, const char* what) {
    need(n, what);
    std::string s = bytes_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  void get_floats(float* out, size_t n, const char* what) {
    need(n * sizeof(float), what);
    std::memcpy(out, bytes_.data() + pos_, n * sizeof(float));
    pos_ += n * sizeof(float);
  }
  void skip(size_t n, const char* what) {
    need(n, what);
    pos_ += n;
  }
  size_t pos() const { return pos_; }
  size_t remaining() const { return bytes_.size() - pos_; }

 private:
  void need(size_t n, const char* what) {
    if (bytes_.size() - pos_ < n)
      fail("{}: truncated: {} needs {} bytes at offset {}, the file has {} bytes", path_.string(),
           what, n, pos_, bytes_.size());
  }
  const std::string& bytes_;
  fs::path path_;
  size_t pos_ = 0;
};

}  // namespace

void llama2c_permute_rope_rows(float* w, int64_t heads, int64_t head_dim, int64_t cols) {
  LT_CHECK(head_dim % 2 == 0, "head_dim {} must be even", head_dim);
  const int64_t half = head_dim / 2;
  std::vector<float> head(head_dim * cols);
  for (int64_t h = 0; h < heads; ++h) {
    float* base = w + h * head_dim * cols;
    std::memcpy(head.data(), base, head.size() * sizeof(float));
    for (int64_t r = 0; r < 2; ++r)
      for (int64_t i = 0; i < half; ++i)
        std::memcpy(base + (r * half + i) * cols, head.data() + (2 * i + r) * cols,
                    cols * sizeof(float));
  }
}

Llama2cModel read_llama2c_checkpoint(const fs::path& path) {
  const std::string bytes = read_file(path);
  ByteReader in(bytes, path);
  int32_t h[7];
  for (int32_t& v : h) v = in.get<int32_t>("the 7 int32 header");
  const int64_t D = h[0], F = h[1], L = h[2], H = h[3], KVH = h[4], V = std::abs(h[5]);
  const int64_t seq_len = h[6];
  const bool tied = h[5] > 0;
  if (D <= 0 || F <= 0 || L <= 0 || H <= 0 || KVH <= 0 || V <= 0 || seq_len <= 0)
    fail("{}: header (dim {}, hidden_dim {}, n_layers {}, n_heads {}, n_kv_heads {}, vocab_size "
         "{}, seq_len {}) has a non-positive size; is this a llama2.c checkpoint?",
         path.string(), h[0], h[1], h[2], h[3], h[4], h[5], h[6]);
  if (D % H != 0 || H % KVH != 0 || (D / H) % 2 != 0)
    fail("{}: header dim {} / n_heads {} / n_kv_heads {} do not give an even head size with "
         "n_heads a multiple of n_kv_heads",
         path.string(), D, H, KVH);
  const int64_t HD = D / H, KVD = KVH * HD;
  // Every size is known from the header: check the file length before reading anything.
  const int64_t floats = V * D + L * D + L * D * D + 2 * L * KVD * D + L * D * D + L * D +
                         3 * L * F * D + D + seq_len * HD + (tied ? 0 : V * D);
  const int64_t want = 28 + floats * 4;
  if (static_cast<int64_t>(bytes.size()) != want)
    fail("{}: the header (dim {}, hidden_dim {}, n_layers {}, n_heads {}, n_kv_heads {}, "
         "vocab_size {}, seq_len {}) implies {} bytes but the file has {} ({})",
         path.string(), h[0], h[1], h[2], h[3], h[4], h[5], h[6], want, bytes.size(),
         static_cast<int64_t>(bytes.size()) < want ? "truncated" : "trailing bytes");

  nlohmann::json j{{"architectures", {"LlamaForCausalLM"}},
                   {"model_type", "llama"},
                   {"hidden_size", D},
                   {"intermediate_size", F},
                   {"num_hidden_layers", L},
                   {"num_attention_heads", H},
                   {"num_key_value_heads", KVH},
                   {"vocab_size", V},
                   {"max_position_embeddings", seq_len},
                   {"rms_norm_eps", 1e-5},
                   {"rope_theta", 10000.0},
                   {"tie_word_embeddings", tied},
                   {"hidden_act", "silu"},
                   {"initializer_range", 0.02},
                   {"attention_bias", false},
                   {"mlp_bias", false},
                   {"bos_token_id", 1},
                   {"eos_token_id", 2},
                   {"torch_dtype", "float32"}};
  Llama2cModel m;
  m.config = parse_model_config(j, path.string());
  const ParamTable table(m.config);
  m.params.assign(table.total_numel(), 0.0f);
  auto at = [&](const std::string& name) {
    const ParamInfo* p = table.find(name);
    LT_CHECK(p, "no parameter {}", name);
    return m.params.data() + p->offset;
  };
  auto layer = [](int64_t l, const char* rest) {
    return "model.layers." + std::to_string(l) + "." + rest;
  };
  // Per-layer tensors are stored layer-major within each kind: (L, rows, cols).
  auto read_layers = [&](const char* name, int64_t rows, int64_t cols, const char* what) {
    for (int64_t l = 0; l < L; ++l) in.get_floats(at(layer(l, name)), rows * cols, what);
  };
  in.get_floats(at("model.embed_tokens.weight"), V * D, "token_embedding_table");
  read_layers("input_layernorm.weight", 1, D, "rms_att_weight");
  read_layers("self_attn.q_proj.weight", D, D, "wq");
  read_layers("self_attn.k_proj.weight", KVD, D, "wk");
  read_layers("self_attn.v_proj.weight", KVD, D, "wv");
  read_layers("self_attn.o_proj.weight", D, D, "wo");
  read_layers("post_attention_layernorm.weight", 1, D, "rms_ffn_weight");
  read_layers("mlp.gate_proj.weight", F, D, "w1");
  read_layers("mlp.down_proj.weight", D, F, "w2");
  read_layers("mlp.up_proj.weight", F, D, "w3");
  in.get_floats(at("model.norm.weight"), D, "rms_final_weight");
  in.skip(seq_len * HD / 2 * 4 * 2, "freq_cis_real/imag");
  if (!tied) in.get_floats(at("lm_head.weight"), V * D, "classifier (wcls)");
  LT_CHECK(in.remaining() == 0, "{} bytes left after reading", in.remaining());
  for (int64_t l = 0; l < L; ++l) {
    llama2c_permute_rope_rows(at(layer(l, "self_attn.q_proj.weight")), H, HD, D);
    llama2c_permute_rope_rows(at(layer(l, "self_attn.k_proj.weight")), KVH, HD, D);
  }
  return m;
}

std::vector<Llama2cToken> read_llama2c_tokenizer(const fs::path& path, int64_t vocab_size) {
  const std::string bytes = read_file(path);
  ByteReader in(bytes, path);
  const int32_t max_len = in.get<int32_t>("max_token_length");
  if (max_len <= 0 || max_len > (1 << 16))
    fail("{}: max_token_length {} is not plausible; is this a llama2.c tokenizer?",
         path.string(), max_len);
  std::vector<Llama2cToken> tokens;
  while (in.remaining() > 0) {
    Llama2cToken t;
    t.score = in.get<float>("a token score");
    const int32_t len = in.get<int32_t>("a token length");
    if (len <= 0 || len > max_len)
      fail("{}: token {} has length {} (max_token_length {})", path.string(), tokens.size(), len,
           max_len);
    t.piece = in.get_bytes(len, "a token's bytes");
    tokens.push_back(std::move(t));
  }
  if (static_cast<int64_t>(tokens.size()) != vocab_size)
    fail("{}: holds {} tokens but the checkpoint's vocab_size is {}", path.string(),
         tokens.size(), vocab_size);
  if (vocab_size < 3) fail("{}: fewer than 3 tokens (<unk>, <s>, </s>)", path.string());
  return tokens;
}

namespace {
const std::string kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's whitespace mark

// The SentencePiece piece behind a llama2.c token (export replaced U+2581 by ' ').
std::string sentencepiece_piece(const Llama2cToken& t, size_t id) {
  if (id == 0) return "<unk>";
  if (id == 1) return "<s>";
  if (id == 2) return "</s>";
  std::string out;
  for (char c : t.piece) out += c == ' ' ? kSpace : std::string(1, c);
  return out;
}
}  // namespace

nlohmann::ordered_json llama2c_tokenizer_json(const std::vector<Llama2cToken>& tokens) {
  std::vector<std::string> pieces;
  std::unordered_map<std::string, int64_t> vocab;
  for (size_t i = 0; i < tokens.size(); ++i) {
    pieces.push_back(sentencepiece_piece(tokens[i], i));
    vocab.emplace(pieces.back(), i);  // first id wins on duplicates, as a dict built in order
  }
  // transformers' generate_merges(vocab, None): for every piece (in id order) every split into
  // two vocabulary pieces, locally sorted by (id left, id right), then stably sorted by
  // (merged id, len left, len right). Lengths are in characters (Python str).
  struct Merge {
    int64_t id, left_id, right_id, left_len, right_len;
    std::string left, right;
  };
  auto utf8_len = [](const std::string& s) {
    int64_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
  };
  std::vector<Merge> merges;
  for (size_t id = 0; id < pieces.size(); ++id) {
    const std::string& p = pieces[id];
    if (vocab.at(p) != static_cast<int64_t>(id)) continue;
    std::vector<Merge> local;
    for (size_t cut = 1; cut < p.size(); ++cut) {
      if ((static_cast<unsigned char>(p[cut]) & 0xC0) == 0x80) continue;  // inside a character
      const std::string l = p.substr(0, cut), r = p.substr(cut);
      auto li = vocab.find(l), ri = vocab.find(r);
      if (li == vocab.end() || ri == vocab.end()) continue;
      local.push_back({static_cast<int64_t>(id), li->second, ri->second, utf8_len(l),
                       utf8_len(r), l, r});
    }
    std::sort(local.begin(), local.end(), [](const Merge& a, const Merge& b) {
      return std::tie(a.left_id, a.right_id) < std::tie(b.left_id, b.right_id);
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    return std::tie(a.id, a.left_len, a.right_len) < std::tie(b.id, b.left_len, b.right_len);
  });

  nlohmann::ordered_json v = nlohmann::ordered_json::object();
  for (size_t i = 0; i < pieces.size(); ++i)
    if (vocab.at(pieces[i]) == static_cast<int64_t>(i)) v[pieces[i]] = i;
  nlohmann::ordered_json merge_list = nlohmann::ordered_json::array();
  for (const Merge& m : merges) merge_list.push_back(m.left + " " + m.right);

  auto added = [](int id, const char* content) {
    return nlohmann::ordered_json{{"id", id},          {"content", content}, {"single_word", false},
                          {"lstrip", false},   {"rstrip", false},    {"normalized", true},
                          {"special", true}};
  };
  nlohmann::ordered_json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = {added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")};
  j["normalizer"] = {
      {"type", "Sequence"},
      {"normalizers",
       {{{"type", "Prepend"}, {"prepend", kSpace}},
        {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpace}}}}};
  j["pre_tokenizer"] = nullptr;
  auto bos = nlohmann::ordered_json{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}};
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"pair",
       {bos,
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
        {{"SpecialToken", {{"id", "<s>"}, {"type_id", 1}}}},
        {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}};
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "Replace"}, {"pattern", {{"String", kSpace}}}, {"content", " "}},
                    {{"type", "ByteFallback"}},
                    {{"type", "Fuse"}},
                    {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  nlohmann::ordered_json model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = "<unk>";
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = true;
  model["byte_fallback"] = true;
  model["vocab"] = v;
  model["merges"] = merge_list;
  j["model"] = model;
  return j;
}

nlohmann::json llama2c_tokenizer_config_json() {
  auto tok = [](const char* content) {
    return nlohmann::json{{"__type", "AddedToken"}, {"content", content}, {"lstrip", false},
                          {"normalized", true},     {"rstrip", false},    {"single_word", false}};
  };
  return {{"add_bos_token", true},
          {"add_eos_token", false},
          {"bos_token", tok("<s>")},
          {"eos_token", tok("</s>")},
          {"unk_token", tok("<unk>")},
          {"pad_token", nullptr},
          {"clean_up_tokenization_spaces", false},
          {"legacy", true},
          {"model_max_length", 512},
          {"tokenizer_class", "LlamaTokenizer"}};
}

void convert_llama2c(const fs::path& checkpoint, const fs::path& tokenizer,
                     const fs::path& output_dir, size_t max_shard_bytes) {
  Llama2cModel m = read_llama2c_checkpoint(checkpoint);
  const auto tokens = read_llama2c_tokenizer(tokenizer, m.config.vocab_size);
  const nlohmann::ordered_json tok_json = llama2c_tokenizer_json(tokens);
  const ParamTable table(m.config);
  save_model(output_dir, m.config, table, m.params.data(), DType::kF32, {}, max_shard_bytes);
  write_file_atomic(output_dir / "tokenizer.json", tok_json.dump(2) + "\n");
  nlohmann::json tc = llama2c_tokenizer_config_json();
  tc["model_max_length"] = m.config.max_position_embeddings;
  write_file_atomic(output_dir / "tokenizer_config.json", tc.dump(2) + "\n");
  const nlohmann::json gen{{"bos_token_id", 1}, {"eos_token_id", 2}, {"max_length", 256}};
  write_file_atomic(output_dir / "generation_config.json", gen.dump(2) + "\n");
}

}  // namespace lt
