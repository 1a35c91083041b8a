// Chat templates: the built-in templates of the major model families, resolution of the
// --chat_template option, and rendering of a conversation as transformers' apply_chat_template.
#pragma once
#include <string>
#include <vector>

#include "data/jinja.h"
#include "data/tokenizer.h"

namespace lt {

// Built-in names: llama2, llama3, mistral, chatml, zephyr, tinyllama (= zephyr's template).
// Returns nullptr for unknown names.
const std::string* builtin_chat_template(const std::string& name);
std::vector<std::string> builtin_chat_template_names();

// option: "" = the tokenizer's chat_template (UserError when it has none, naming
// --chat_template), a built-in name, or a path to a file holding a Jinja template.
std::string resolve_chat_template(const std::string& option, const Tokenizer* tokenizer);

// The variables transformers passes to a chat template: messages, add_generation_prompt,
// bos_token, eos_token, and tools when not null.
struct ChatRenderInput {
  const jinja::Value* messages = nullptr;  // array of {role, content}
  const jinja::Value* tools = nullptr;     // may be null
  bool add_generation_prompt = false;
  std::string bos_token, eos_token;
};
std::string render_chat(const jinja::Template& tmpl, const ChatRenderInput& input);

}  // namespace lt
