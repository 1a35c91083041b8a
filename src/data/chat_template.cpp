// Built-in chat templates, copied verbatim from the models' tokenizer_config.json files, and
// the resolution and rendering helpers.
#include "data/chat_template.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "core/error.h"

namespace lt {
namespace {

// meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template".
const char* kLlama2 =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

// meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template".
const char* kLlama3 =
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}";

// mistralai/Mistral-7B-Instruct-v0.2 (and Mixtral-8x7B-Instruct-v0.1) "chat_template".
const char* kMistral =
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}";

// Qwen/Qwen2-7B-Instruct "chat_template" (ChatML with Qwen's default system prompt).
const char* kChatml =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

// HuggingFaceH4/zephyr-7b-beta "chat_template"; TinyLlama/TinyLlama-1.1B-Chat-v1.0 uses the
// same string.
const char* kZephyr =
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}";

const std::map<std::string, std::string>& builtins() {
  static const std::map<std::string, std::string> kTemplates = {
      {"llama2", kLlama2}, {"llama3", kLlama3}, {"mistral", kMistral},
      {"chatml", kChatml}, {"zephyr", kZephyr}, {"tinyllama", kZephyr}};
  return kTemplates;
}

std::string names_joined() {
  std::string out;
  for (const auto& n : builtin_chat_template_names()) out += (out.empty() ? "" : "|") + n;
  return out;
}

}  // namespace

const std::string* builtin_chat_template(const std::string& name) {
  auto it = builtins().find(name);
  return it == builtins().end() ? nullptr : &it->second;
}

std::vector<std::string> builtin_chat_template_names() {
  std::vector<std::string> names;
  for (const auto& [k, v] : builtins()) names.push_back(k);
  return names;
}

std::string resolve_chat_template(const std::string& option, const Tokenizer* tokenizer) {
  if (option.empty()) {
    if (tokenizer && !tokenizer->chat_template().empty()) return tokenizer->chat_template();
    fail(
        "the tokenizer has no chat_template (tokenizer_config.json) to render conversations; "
        "pass --chat_template {} or a Jinja template file",
        names_joined());
  }
  if (const std::string* t = builtin_chat_template(option)) return *t;
  std::error_code ec;
  if (!std::filesystem::is_regular_file(option, ec))
    fail("--chat_template '{}': neither a built-in template ({}) nor a readable file", option,
         names_joined());
  std::ifstream in(option, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in) fail("--chat_template '{}': cannot read the file", option);
  return ss.str();
}

std::string render_chat(const jinja::Template& tmpl, const ChatRenderInput& input) {
  jinja::Value ctx = jinja::Value::object();
  ctx["messages"] = input.messages ? *input.messages : jinja::Value::array();
  ctx["add_generation_prompt"] = input.add_generation_prompt;
  ctx["bos_token"] = input.bos_token;
  ctx["eos_token"] = input.eos_token;
  if (input.tools && !input.tools->is_null()) ctx["tools"] = *input.tools;
  return tmpl.render(ctx);
}

}  // namespace lt
