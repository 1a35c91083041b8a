// Tokenized-dataset cache (see token_cache.h): key hashing with xxHash (XXH3), the binary
// writer, and the mmap reader that validates every byte before trusting it.
#include "data/token_cache.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <system_error>

#include "core/error.h"
#include "data/chat_template.h"
#include "io/atomic_file.h"

namespace lt {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'L', 'T', 'T', 'O', 'K', 'C', 'A', 'C'};
constexpr uint32_t kVersion = 1;
// Bumped whenever tokenization or dataset code changes what a file turns into, so that caches
// written by an older longtune are rebuilt rather than trusted.
constexpr uint32_t kTokenizationVersion = 1;

struct Header {
  char magic[8];
  uint64_t checksum;  // XXH3-64 of every byte after this field
  uint32_t version;
  uint32_t format;
  uint64_t key_lo, key_hi;
  uint64_t rows, tokens, has_doc_ids, stats_bytes;
};
static_assert(sizeof(Header) == 72, "the header is 72 bytes with no padding");
constexpr size_t kChecksummedFrom = offsetof(Header, version);

uint64_t pad8(uint64_t n) { return (n + 7) / 8 * 8; }

// Streams a file's bytes into the hash state, prefixed by its length and a label so that
// (a, bc) and (ab, c) hash differently.
void hash_file(XXH3_state_t* state, const std::string& label, const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open {} to compute the token cache key", path.string(), label);
  XXH3_128bits_update(state, label.data(), label.size());
  std::vector<char> buf(1 << 20);
  uint64_t total = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const std::streamsize n = in.gcount();
    if (n <= 0) break;
    XXH3_128bits_update(state, buf.data(), static_cast<size_t>(n));
    total += static_cast<uint64_t>(n);
  }
  if (in.bad()) fail("{}: read error while hashing {}", path.string(), label);
  XXH3_128bits_update(state, &total, sizeof total);
}

void hash_string(XXH3_state_t* state, const std::string& label, const std::string& value) {
  const std::string s = fmt::format("{}={}\n", label, value.size());
  XXH3_128bits_update(state, s.data(), s.size());
  XXH3_128bits_update(state, value.data(), value.size());
}

nlohmann::json stats_to_json(const DatasetStats& s) {
  nlohmann::json counts = nlohmann::json::array();
  for (const auto& [reason, n] : s.skip_counts) counts.push_back({reason, n});
  return {{"rows_read", s.rows_read},       {"rows_kept", s.rows_kept},
          {"rows_truncated", s.rows_truncated}, {"rows_skipped", s.rows_skipped},
          {"skip_reasons", s.skip_reasons}, {"skip_counts", counts}};
}

// Inverse of stats_to_json; false when a field is missing or mistyped.
bool stats_from_json(const nlohmann::json& j, DatasetStats* s) {
  try {
    s->rows_read = j.at("rows_read").get<int64_t>();
    s->rows_kept = j.at("rows_kept").get<int64_t>();
    s->rows_truncated = j.at("rows_truncated").get<int64_t>();
    s->rows_skipped = j.at("rows_skipped").get<int64_t>();
    s->skip_reasons = j.at("skip_reasons").get<std::vector<std::string>>();
    s->skip_counts.clear();
    for (const auto& c : j.at("skip_counts"))
      s->skip_counts.emplace_back(c.at(0).get<std::string>(), c.at(1).get<int64_t>());
  } catch (const nlohmann::json::exception&) {
    return false;
  }
  return true;
}

// A read-only mapping of a whole file; unmapped on destruction.
class MappedFile {
 public:
  // False (with *why) when the file cannot be opened or mapped.
  bool open(const fs::path& path, std::string* why) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      *why = std::error_code(errno, std::generic_category()).message();
      return false;
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      *why = "not a regular file";
      return false;
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (m == MAP_FAILED) {
        *why = std::error_code(errno, std::generic_category()).message();
        ::close(fd);
        size_ = 0;
        return false;
      }
      data_ = static_cast<const uint8_t*>(m);
    }
    ::close(fd);  // the mapping keeps the file alive
    return true;
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace

std::string TokenCacheKey::hex() const { return fmt::format("{:016x}{:016x}", hi, lo); }

TokenCacheKey token_cache_key(const fs::path& data_path, const fs::path& tokenizer_path,
                              const DatasetOptions& options, int64_t vocab_size) {
  XXH3_state_t* state = XXH3_createState();
  if (!state) fail("out of memory creating an xxHash state");
  struct Free {
    XXH3_state_t* s;
    ~Free() { XXH3_freeState(s); }
  } free_state{state};
  XXH3_128bits_reset(state);
  hash_string(state, "longtune token cache",
              fmt::format("{}.{}", kVersion, kTokenizationVersion));
  hash_string(state, "data extension", data_path.extension().string());
  hash_file(state, "data file", data_path);
  if (tokenizer_path.empty()) {
    hash_string(state, "tokenizer", "none");
  } else {
    const fs::path json_file =
        fs::is_directory(tokenizer_path) ? tokenizer_path / "tokenizer.json" : tokenizer_path;
    hash_file(state, "tokenizer.json", json_file);
    const fs::path config = json_file.parent_path() / "tokenizer_config.json";
    if (fs::exists(config)) {
      hash_file(state, "tokenizer_config.json", config);
    } else {
      hash_string(state, "tokenizer_config.json", "absent");
    }
  }
  hash_string(state, "format", dataset_format_name(options.format));
  hash_string(state, "model_max_length", std::to_string(options.model_max_length));
  hash_string(state, "train_on_inputs", options.train_on_inputs ? "1" : "0");
  hash_string(state, "packing", options.packing ? "1" : "0");
  hash_string(state, "max_rows", std::to_string(options.max_rows));
  hash_string(state, "vocab_size", std::to_string(vocab_size));
  hash_string(state, "chat_template", options.chat_template);
  // A template given as a file is keyed by its contents, not only by its name.
  if (!options.chat_template.empty() && !builtin_chat_template(options.chat_template) &&
      fs::is_regular_file(options.chat_template))
    hash_file(state, "chat template file", options.chat_template);
  const XXH128_hash_t h = XXH3_128bits_digest(state);
  return {h.low64, h.high64};
}

fs::path default_cache_dir() {
  if (const char* env = std::getenv("LONGTUNE_CACHE"); env && *env) return env;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg)
    return fs::path(xdg) / "longtune";
  if (const char* home = std::getenv("HOME"); home && *home)
    return fs::path(home) / ".cache" / "longtune";
  return fs::temp_directory_path() / "longtune-cache";
}

void write_token_cache(const fs::path& file, const TokenCacheKey& key, const Dataset& ds) {
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.version = kVersion;
  h.format = static_cast<uint32_t>(ds.format);
  h.key_lo = key.lo;
  h.key_hi = key.hi;
  h.rows = ds.rows.size();
  std::vector<uint64_t> offsets{0};
  bool has_doc_ids = false;
  for (const Example& ex : ds.rows) {
    offsets.push_back(offsets.back() + ex.input_ids.size());
    has_doc_ids = has_doc_ids || !ex.doc_ids.empty();
  }
  h.tokens = offsets.back();
  h.has_doc_ids = has_doc_ids ? 1 : 0;
  std::string stats = stats_to_json(ds.stats).dump();
  h.stats_bytes = stats.size();
  stats.resize(pad8(stats.size()), '\0');

  // The body after the header is built in memory so that its checksum goes into the header.
  std::string body;
  const uint64_t streams = has_doc_ids ? 3 : 2;
  body.reserve(stats.size() + offsets.size() * 8 + h.tokens * 4 * streams);
  body += stats;
  body.append(reinterpret_cast<const char*>(offsets.data()), offsets.size() * sizeof(uint64_t));
  auto append_i32 = [&](auto member) {
    for (const Example& ex : ds.rows) {
      const std::vector<int32_t>& v = ex.*member;
      body.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(int32_t));
    }
  };
  append_i32(&Example::input_ids);
  append_i32(&Example::labels);
  if (has_doc_ids) {
    for (const Example& ex : ds.rows) {
      std::vector<int32_t> doc = ex.doc_ids;
      doc.resize(ex.input_ids.size(), 0);  // an unpacked row among packed ones: one document
      body.append(reinterpret_cast<const char*>(doc.data()), doc.size() * sizeof(int32_t));
    }
  }
  body.resize(pad8(body.size()), '\0');

  XXH3_state_t* state = XXH3_createState();
  if (!state) fail("out of memory creating an xxHash state");
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, reinterpret_cast<const char*>(&h) + kChecksummedFrom,
                     sizeof h - kChecksummedFrom);
  XXH3_64bits_update(state, body.data(), body.size());
  h.checksum = XXH3_64bits_digest(state);
  XXH3_freeState(state);

  std::error_code ec;
  fs::create_directories(file.parent_path(), ec);
  if (ec)
    fail("--cache_dir: cannot create '{}': {}", file.parent_path().string(), ec.message());
  AtomicFile out(file);
  out.write(&h, sizeof h);
  out.write(body);
  out.commit();
}

CacheRead read_token_cache(const fs::path& file, const TokenCacheKey& key, Dataset* ds,
                           std::string* why) {
  std::error_code ec;
  if (!fs::exists(file, ec)) return CacheRead::kMissing;
  MappedFile m;
  std::string err;
  if (!m.open(file, &err)) {
    *why = fmt::format("cannot map it: {}", err);
    return CacheRead::kCorrupt;
  }
  if (m.size() < sizeof(Header)) {
    *why = fmt::format("{} bytes, shorter than the {}-byte header (truncated)", m.size(),
                       sizeof(Header));
    return CacheRead::kCorrupt;
  }
  Header h;
  std::memcpy(&h, m.data(), sizeof h);
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) {
    *why = "not a longtune token cache (bad magic)";
    return CacheRead::kCorrupt;
  }
  const uint64_t sum = XXH3_64bits(m.data() + kChecksummedFrom, m.size() - kChecksummedFrom);
  if (sum != h.checksum) {
    *why = fmt::format("checksum mismatch (stored {:016x}, computed {:016x}): truncated or corrupt",
                       h.checksum, sum);
    return CacheRead::kCorrupt;
  }
  if (h.version != kVersion) {
    *why = fmt::format("written by cache format version {} (this longtune reads {})", h.version,
                       kVersion);
    return CacheRead::kStale;
  }
  if (h.key_lo != key.lo || h.key_hi != key.hi) {
    *why = "its key differs from this data, tokenizer and settings";
    return CacheRead::kStale;
  }
  // The checksum matched, but the layout is still checked so that a well-formed checksum over
  // nonsense (a bug in a writer) can never read out of bounds.
  if (h.has_doc_ids > 1 || h.format > static_cast<uint32_t>(DatasetFormat::kTokenized) ||
      h.rows > m.size() || h.tokens > m.size() || h.stats_bytes > m.size()) {
    *why = "its header holds impossible counts";
    return CacheRead::kCorrupt;
  }
  const uint64_t streams = h.has_doc_ids ? 3 : 2;
  const uint64_t want =
      sizeof(Header) + pad8(h.stats_bytes) + (h.rows + 1) * 8 + pad8(h.tokens * 4 * streams);
  if (want != m.size()) {
    *why = fmt::format("its header describes {} bytes but the file has {} (truncated?)", want,
                       m.size());
    return CacheRead::kCorrupt;
  }
  const uint8_t* p = m.data() + sizeof(Header);
  Dataset out;
  out.format = static_cast<DatasetFormat>(h.format);
  nlohmann::json stats = nlohmann::json::parse(p, p + h.stats_bytes, nullptr, false);
  if (stats.is_discarded() || !stats_from_json(stats, &out.stats)) {
    *why = "its statistics block is not valid";
    return CacheRead::kCorrupt;
  }
  p += pad8(h.stats_bytes);
  std::vector<uint64_t> offsets(h.rows + 1);
  std::memcpy(offsets.data(), p, offsets.size() * 8);
  p += offsets.size() * 8;
  if (offsets[0] != 0 || offsets[h.rows] != h.tokens) {
    *why = "its row offsets are not valid";
    return CacheRead::kCorrupt;
  }
  for (uint64_t r = 0; r < h.rows; ++r) {
    if (offsets[r + 1] < offsets[r]) {
      *why = fmt::format("its row offsets decrease at row {}", r);
      return CacheRead::kCorrupt;
    }
  }
  const auto* ids = reinterpret_cast<const int32_t*>(p);
  const int32_t* labels = ids + h.tokens;
  const int32_t* docs = h.has_doc_ids ? labels + h.tokens : nullptr;
  out.rows.resize(h.rows);
  for (uint64_t r = 0; r < h.rows; ++r) {
    Example& ex = out.rows[r];
    ex.input_ids.assign(ids + offsets[r], ids + offsets[r + 1]);
    ex.labels.assign(labels + offsets[r], labels + offsets[r + 1]);
    if (docs) ex.doc_ids.assign(docs + offsets[r], docs + offsets[r + 1]);
  }
  *ds = std::move(out);
  return CacheRead::kHit;
}

std::string CachedLoad::summary() const {
  if (hit) return "reusing cache " + file.string();
  if (written) return "wrote cache " + file.string();
  return "not cached";
}

CachedLoad load_dataset_cached(const fs::path& data_path, const Tokenizer* tokenizer,
                               const fs::path& tokenizer_path, const DatasetOptions& options,
                               int64_t vocab_size, const fs::path& cache_dir,
                               CacheWrite write_policy) {
  CachedLoad r;
  const TokenCacheKey key = token_cache_key(data_path, tokenizer_path, options, vocab_size);
  r.file = cache_dir / (key.hex() + ".ltc");
  std::string why;
  switch (read_token_cache(r.file, key, &r.dataset, &why)) {
    case CacheRead::kHit:
      r.hit = true;
      return r;
    case CacheRead::kMissing:
      break;
    case CacheRead::kStale:
    case CacheRead::kCorrupt:
      r.note = fmt::format("cache file {} is unusable ({}); rebuilding it", r.file.string(), why);
      break;
  }
  r.dataset = load_dataset(data_path, tokenizer, options, vocab_size);
  try {
    write_token_cache(r.file, key, r.dataset);
    r.written = true;
  } catch (const UserError& e) {
    if (write_policy == CacheWrite::kRequired) throw;
    r.note += fmt::format("{}cannot write the token cache: {}", r.note.empty() ? "" : "; ",
                          e.what());
  }
  return r;
}

}  // namespace lt
