// `longtune generate`: sample text from a Hugging Face model folder with a KV cache, streaming
// the text as it is produced.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cli/commands.h"
#include "cli/flags.h"
#include "core/error.h"
#include "data/tokenizer.h"
#include "io/safetensors.h"
#include "model/adapter_io.h"
#include "model/generate.h"
#include "model/model_io.h"

namespace lt {

namespace fs = std::filesystem;

namespace {

std::vector<int32_t> parse_prompt_ids(const std::string& text, int64_t V) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || item.find_first_not_of(" \t", used) != std::string::npos)
      fail("--prompt_ids: '{}' is not an integer; give comma-separated token ids like 1,2,3", item);
    if (v < 0 || v >= V)
      fail("--prompt_ids: id {} is outside the model's vocabulary [0, {})", v, V);
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) fail("--prompt_ids: no ids given");
  return ids;
}

// eos_token_id of a config.json / generation_config.json (an int or a list of ints).
void add_eos_ids(const nlohmann::json& j, std::vector<int32_t>* out) {
  if (!j.is_object() || !j.contains("eos_token_id")) return;
  const auto& e = j["eos_token_id"];
  if (e.is_number_integer()) out->push_back(e.get<int32_t>());
  if (e.is_array())
    for (const auto& v : e)
      if (v.is_number_integer()) out->push_back(v.get<int32_t>());
}

}  // namespace

int cmd_generate(int argc, char** argv) {
  CLI::App app{"Generate text from a Hugging Face model folder", "longtune generate"};
  std::string model_dir, adapter, prompt, prompt_ids_text, chat_template;
  GenerateOptions g;
  bool chat = false, output_ids = false;
  app.add_option("--model_name_or_path", model_dir, "Hugging Face model folder")->required();
  app.add_option("--adapter_name_or_path", adapter, "PEFT LoRA adapter folder");
  auto* p_opt = app.add_option("--prompt", prompt, "prompt text (tokenized with the model's tokenizer)");
  auto* ids_opt = app.add_option("--prompt_ids", prompt_ids_text, "prompt as token ids: 1,2,3");
  p_opt->excludes(ids_opt);
  add_bool_flag(app, "--chat", &chat, "wrap the prompt as one user message in the chat template");
  app.add_option("--chat_template", chat_template,
                 "with --chat: built-in template name or a file (default: the tokenizer's)");
  app.add_option("--max_new_tokens", g.max_new_tokens, "most tokens to generate")
      ->check(CLI::PositiveNumber);
  app.add_option("--temperature", g.sampling.temperature, "0 = greedy")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--top_k", g.sampling.top_k, "keep the k most likely tokens (0 = off)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--top_p", g.sampling.top_p, "nucleus sampling threshold (1 = off)")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--seed", g.sampling.seed, "random seed of the sampler");
  add_bool_flag(app, "--output_ids", &output_ids,
                "print the generated ids as a JSON list instead of the text");
  // Hidden (for tools/check_hf_roundtrip.py): the prompt's logits (P,V) as an f32 tensor
  // "logits" in a safetensors file (the prompt ids in its metadata), instead of generating.
  std::string dump_logits;
  app.add_option("--dump_logits", dump_logits, "write the prompt's logits to FILE and stop")
      ->group("");
  if (!parse_flags(app, argc, argv)) return 0;
  if (prompt_ids_text.empty() && p_opt->count() == 0)
    fail("give --prompt TEXT or --prompt_ids 1,2,3");

  const fs::path dir = model_dir;
  if (!fs::is_directory(dir) || !fs::exists(dir / "config.json"))
    fail("--model_name_or_path '{}' is not a model folder (no config.json)", model_dir);
  const ModelConfig config = load_model_config(dir / "config.json");
  const ParamTable table(config);
  std::vector<float> params(table.total_numel());
  load_weights(CheckpointReader(dir), table, params.data());
  // A PEFT adapter is merged into the weights (W += scale * B A), as merge_and_unload does.
  if (!adapter.empty()) merge_adapter(adapter, config, table, params.data());
  const ModelWeights weights = table.bind(params.data());

  std::unique_ptr<Tokenizer> tok;
  if (fs::exists(dir / "tokenizer.json")) tok = Tokenizer::load(dir);
  if (!tok && (p_opt->count() > 0 || chat || (!output_ids && dump_logits.empty())))
    fail("--model_name_or_path '{}' has no tokenizer.json; use --prompt_ids with --output_ids",
         model_dir);
  if (chat && p_opt->count() == 0) fail("--chat needs --prompt TEXT");

  std::vector<int32_t> ids;
  if (!prompt_ids_text.empty()) {
    ids = parse_prompt_ids(prompt_ids_text, config.vocab_size);
  } else if (chat) {
    ids = chat_prompt_ids(*tok, chat_template, prompt);
  } else {
    ids = tok->encode(prompt, true);
  }
  if (ids.empty()) {
    if (!tok || !tok->bos_id()) fail("--prompt: the prompt is empty and the tokenizer has no BOS");
    ids.push_back(*tok->bos_id());
  }
  for (int32_t id : ids)
    if (id < 0 || id >= config.vocab_size)
      fail("--prompt: token id {} is outside the model's vocabulary of {}", id, config.vocab_size);

  if (tok && tok->eos_id()) g.stop_ids.push_back(*tok->eos_id());
  add_eos_ids(config.raw, &g.stop_ids);
  if (fs::exists(dir / "generation_config.json"))
    add_eos_ids(nlohmann::json::parse(std::ifstream(dir / "generation_config.json"), nullptr,
                                      false),
                &g.stop_ids);

  if (!dump_logits.empty()) {
    const int64_t P = static_cast<int64_t>(ids.size()), V = config.vocab_size;
    IncrementalDecoder prefill(config, weights, P);
    std::vector<float> logits(static_cast<size_t>(P * V));
    prefill.step(ids.data(), P, logits.data(), LogitsFor::kAll);
    write_safetensors(dump_logits, {{"logits", {P, V}, logits.data()}}, DType::kF32,
                      {{"format", "pt"}, {"input_ids", nlohmann::json(ids).dump()}});
    fmt::print("wrote the logits of {} prompt tokens to {}\n", P, dump_logits);
    return 0;
  }
  const int64_t max_len = static_cast<int64_t>(ids.size()) + g.max_new_tokens;
  if (max_len > config.max_position_embeddings)
    fmt::print(stderr, "longtune: warning: {} positions exceed max_position_embeddings {}\n",
               max_len, config.max_position_embeddings);
  IncrementalDecoder decoder(config, weights, max_len);
  std::unique_ptr<TextStreamer> streamer;
  if (!output_ids) streamer = std::make_unique<TextStreamer>(*tok, ids);
  const auto t0 = std::chrono::steady_clock::now();
  const auto out = generate(decoder, ids, g, [&](int32_t id) {
    if (!streamer) return;
    const std::string piece = streamer->put(id);
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
  });
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (streamer) {
    const std::string rest = streamer->flush();
    std::fwrite(rest.data(), 1, rest.size(), stdout);
    std::fputs("\n", stdout);
  } else {
    fmt::print("{}\n", nlohmann::json(out).dump());
  }
  std::fflush(stdout);
  fmt::print(stderr, "[{} prompt + {} generated tokens in {:.2f} s, {:.1f} tokens/s]\n",
             ids.size(), out.size(), secs, secs > 0 ? out.size() / secs : 0.0);
  return 0;
}

}  // namespace lt
