// Tokenized-dataset cache: a dataset is tokenized once into a binary file keyed by an xxHash of
// the data file's bytes, the tokenizer files' bytes and the settings, and read back with mmap.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>

#include "data/dataset.h"
#include "data/tokenizer.h"

namespace lt {

// Cache file layout (little-endian, every section 8-byte aligned):
//   header   {magic "LTTOKCAC", u64 checksum (XXH3-64 of every byte after this field),
//             u32 version, u32 format (DatasetFormat), u64 key_lo, u64 key_hi,
//             u64 R (rows), u64 N (tokens), u64 has_doc_ids, u64 stats_bytes}
//   stats    JSON of DatasetStats, zero-padded to 8 bytes
//   offsets  u64[R + 1]   row r is tokens [offsets[r], offsets[r + 1])
//   ids      i32[N]       input_ids of all rows concatenated
//   labels   i32[N]
//   doc_ids  i32[N]       only when has_doc_ids (packed rows)
struct TokenCacheKey {
  uint64_t lo = 0, hi = 0;  // XXH3-128
  std::string hex() const;  // 32 hex digits: the cache file's name
  bool operator==(const TokenCacheKey&) const = default;
};

// What the cache key covers. tokenizer_path as given to Tokenizer::load (a tokenizer.json or a
// folder); empty = no tokenizer (pre-tokenized data). UserError when a file cannot be read.
TokenCacheKey token_cache_key(const std::filesystem::path& data_path,
                              const std::filesystem::path& tokenizer_path,
                              const DatasetOptions& options, int64_t vocab_size);

// $LONGTUNE_CACHE, else $XDG_CACHE_HOME/longtune, else ~/.cache/longtune.
std::filesystem::path default_cache_dir();

// Writes `ds` to `file` atomically (temporary file, fsync, rename). UserError on write errors.
void write_token_cache(const std::filesystem::path& file, const TokenCacheKey& key,
                       const Dataset& ds);

enum class CacheRead { kHit, kMissing, kStale, kCorrupt };

// Maps `file` and copies its rows into *ds when it is a complete cache of `key`. Never throws on
// bad cache contents: kCorrupt (bad magic, short file, checksum or layout mismatch) and kStale
// (other version or key) come with *why saying what was wrong.
CacheRead read_token_cache(const std::filesystem::path& file, const TokenCacheKey& key,
                           Dataset* ds, std::string* why);

enum class CacheWrite { kRequired, kBestEffort };

struct CachedLoad {
  // "reusing cache FILE", "wrote cache FILE" or "not cached" (for the data: log line).
  std::string summary() const;
  Dataset dataset;
  std::filesystem::path file;  // the cache file
  bool hit = false;      // read from the cache file
  bool written = false;  // tokenized and written to the cache file
  std::string note;  // why a cache file was rebuilt or could not be written ("" = nothing)
};

// load_dataset through the cache in cache_dir: reuses a matching cache file, otherwise tokenizes
// and writes one (a write failure is a UserError when kRequired, a note when kBestEffort).
CachedLoad load_dataset_cached(const std::filesystem::path& data_path,
                               const Tokenizer* tokenizer,
                               const std::filesystem::path& tokenizer_path,
                               const DatasetOptions& options, int64_t vocab_size,
                               const std::filesystem::path& cache_dir, CacheWrite write_policy);

}  // namespace lt
