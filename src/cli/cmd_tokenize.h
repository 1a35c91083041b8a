// `longtune tokenize`: encodes a JSON array of strings (or decodes id lists) from stdin.
#pragma once

namespace lt {

// argv[0] is "tokenize". Flags: --tokenizer PATH, --add_special_tokens [True|False], --decode,
// --skip_special_tokens. Prints a JSON array on stdout. UserError on bad flags or input.
int cmd_tokenize(int argc, char** argv);

}  // namespace lt
