// Config files and flag suggestions (see config_file.h).
#include "cli/config_file.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"

namespace lt {

namespace {

std::string strip_dashes(std::string s) {
  s.erase(0, s.find_first_not_of('-'));
  return s;
}

std::string json_scalar(const nlohmann::json& v, const std::string& where) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number()) return fmt::format("{}", v.get<double>());
  fail("{}: a flag value must be a string, number, boolean or a list of them", where);
}

// Name of a flag argument ("--a=b" -> "a", "--a" -> "a"); "" when arg is not a long flag.
std::string flag_name(const std::string& arg) {
  if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) return "";
  return arg.substr(2, arg.find('=') == std::string::npos ? std::string::npos : arg.find('=') - 2);
}

}  // namespace

std::vector<std::string> read_config_flags(const std::filesystem::path& path) {
  const std::string text = read_file(path);
  std::vector<std::pair<std::string, std::string>> kv;
  const std::string ext = path.extension().string();
  if (ext == ".json") {
    const auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) fail("--config '{}': not valid JSON", path.string());
    if (!j.is_object())
      fail("--config '{}': the top level must be an object of flags", path.string());
    for (const auto& [k, v] : j.items()) {
      const std::string where = fmt::format("--config '{}': key '{}'", path.string(), k);
      if (v.is_null()) continue;
      if (v.is_array()) {
        std::string joined;
        for (const auto& e : v) joined += (joined.empty() ? "" : ",") + json_scalar(e, where);
        kv.emplace_back(k, joined);
      } else {
        kv.emplace_back(k, json_scalar(v, where));
      }
    }
  } else {
    YAML::Node root;
    try {
      root = YAML::Load(text);
    } catch (const YAML::Exception& e) {
      fail("--config '{}': not valid YAML: {}", path.string(), e.what());
    }
    if (root.IsNull()) return {};
    if (!root.IsMap())
      fail("--config '{}': the top level must be a mapping of flags", path.string());
    for (const auto& it : root) {
      const std::string k = it.first.as<std::string>();
      const YAML::Node& v = it.second;
      if (v.IsNull()) continue;
      if (v.IsScalar()) {
        kv.emplace_back(k, v.as<std::string>());
      } else if (v.IsSequence()) {
        std::string joined;
        for (const auto& e : v) {
          if (!e.IsScalar())
            fail("--config '{}': key '{}': list items must be plain values", path.string(), k);
          joined += (joined.empty() ? "" : ",") + e.as<std::string>();
        }
        kv.emplace_back(k, joined);
      } else {
        fail("--config '{}': key '{}': a flag value must be a plain value or a list", path.string(),
             k);
      }
    }
  }
  std::vector<std::string> out;
  for (auto& [k, v] : kv) {
    out.push_back("--" + strip_dashes(k));
    out.push_back(v);
  }
  return out;
}

std::vector<std::string> expand_config_flag(const std::vector<std::string>& args,
                                            const std::set<std::string>& known_flags) {
  std::vector<std::string> rest;
  std::filesystem::path config;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--config") {
      if (i + 1 >= args.size()) fail("--config needs a file name");
      config = args[++i];
    } else if (args[i].rfind("--config=", 0) == 0) {
      config = args[i].substr(9);
    } else {
      rest.push_back(args[i]);
    }
  }
  if (config.empty()) return rest;
  std::set<std::string> given;
  for (const auto& a : rest)
    if (auto n = flag_name(a); !n.empty()) given.insert(n);
  const std::vector<std::string> from_file = read_config_flags(config);
  std::vector<std::string> out;
  for (size_t i = 0; i < from_file.size(); i += 2) {
    const std::string name = from_file[i].substr(2);
    if (name == "config") fail("--config '{}': a config file cannot name another", config.string());
    if (!known_flags.count(name))
      fail("--config '{}': unknown flag '{}'.{}", config.string(), name,
           did_you_mean(name, known_flags));
    if (given.count(name)) continue;  // the command line overrides the file
    out.push_back(from_file[i]);
    out.push_back(from_file[i + 1]);
  }
  out.insert(out.end(), rest.begin(), rest.end());
  return out;
}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string did_you_mean(std::string_view name, const std::set<std::string>& known_flags) {
  std::string best;
  size_t best_d = SIZE_MAX;
  for (const auto& k : known_flags) {
    const size_t d = edit_distance(name, k);
    if (d < best_d) best_d = d, best = k;
  }
  if (best.empty() || best_d > std::max<size_t>(2, name.size() / 3)) return "";
  return fmt::format(" Did you mean --{}?", best);
}

}  // namespace lt
