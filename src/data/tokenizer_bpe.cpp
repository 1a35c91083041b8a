// The BPE model of tokenizer.json: vocab + merges (either "a b" strings or [a, b] pairs), unk,
// fuse_unk, byte_fallback, ignore_merges, continuing_subword_prefix / end_of_word_suffix.
// Merging follows HF's Word::merge_all: repeatedly apply the lowest-rank pair, leftmost first.
#include <algorithm>

#include "core/error.h"
#include "data/tokenizer_parts.h"

namespace lt::tok {

namespace {
constexpr uint64_t kEmpty = ~uint64_t{0};
inline uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}
inline uint64_t hash_key(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return k;
}
}  // namespace

BpeModel::BpeModel(const json& model, const Origin& where) {
  auto vocab_it = model.find("vocab");
  if (vocab_it == model.end() || !vocab_it->is_object())
    fail_at(where, "BPE model has no \"vocab\" object");
  vocab_.reserve(vocab_it->size() * 2);
  int32_t max_id = -1;
  for (auto it = vocab_it->begin(); it != vocab_it->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > INT32_MAX)
      fail_at(where.at("vocab"), fmt::format("id of '{}' is not a non-negative integer", it.key()));
    int32_t id = it.value().get<int32_t>();
    vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  // id_to_token_ is indexed by id: an absurd id would allocate gigabytes (found by fuzzing).
  if (max_id >= kMaxTokenId)
    fail_at(where.at("vocab"), fmt::format("id {} is absurdly large (ids must be below {})",
                                           max_id, kMaxTokenId));
  id_to_token_.resize(static_cast<size_t>(max_id + 1));
  for (const auto& [tok, id] : vocab_) id_to_token_[id] = tok;

  auto opt_string = [&](const char* name) -> std::string {
    auto it = model.find(name);
    if (it == model.end() || it->is_null()) return {};
    if (!it->is_string()) fail_at(where.at(name), "expected a string or null");
    return it->get<std::string>();
  };
  std::string unk = opt_string("unk_token");
  if (!unk.empty()) {
    auto it = vocab_.find(unk);
    if (it == vocab_.end())
      fail_at(where.at("unk_token"), fmt::format("unk token '{}' is not in the vocab", unk));
    unk_id_ = it->second;
  }
  continuing_subword_prefix_ = opt_string("continuing_subword_prefix");
  end_of_word_suffix_ = opt_string("end_of_word_suffix");
  byte_fallback_ = model.value("byte_fallback", false);
  fuse_unk_ = model.value("fuse_unk", false);
  ignore_merges_ = model.value("ignore_merges", false);
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_.find(fmt::format("<0x{:02X}>", b));
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }

  auto merges_it = model.find("merges");
  if (merges_it == model.end() || !merges_it->is_array())
    fail_at(where, "BPE model has no \"merges\" array");
  size_t n = merges_it->size();
  size_t cap = 16;
  while (cap < n * 2) cap *= 2;
  merge_keys_.assign(cap, kEmpty);
  merge_values_.assign(cap, 0);
  merge_mask_ = cap - 1;
  size_t prefix_len = continuing_subword_prefix_.size();
  for (size_t rank = 0; rank < n; ++rank) {
    const json& m = (*merges_it)[rank];
    std::string a, b;
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail_at(where.at(fmt::format("merges[{}]", rank)), fmt::format("'{}' is not 'a b'", s));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      fail_at(where.at(fmt::format("merges[{}]", rank)), "expected \"a b\" or [\"a\", \"b\"]");
    }
    auto ia = vocab_.find(a), ib = vocab_.find(b);
    std::string merged = a + (b.size() >= prefix_len ? b.substr(prefix_len) : std::string());
    auto im = vocab_.find(merged);
    if (ia == vocab_.end() || ib == vocab_.end() || im == vocab_.end())
      fail_at(where.at(fmt::format("merges[{}]", rank)),
              fmt::format("merge '{} {}' uses a token missing from the vocab", a, b));
    uint64_t key = pair_key(ia->second, ib->second);
    for (uint64_t h = hash_key(key) & merge_mask_;; h = (h + 1) & merge_mask_) {
      if (merge_keys_[h] == key) break;  // duplicate merge: the first (lowest rank) wins
      if (merge_keys_[h] == kEmpty) {
        merge_keys_[h] = key;
        merge_values_[h] = (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(im->second);
        break;
      }
    }
  }
  cache_.reserve(4096);
}

uint64_t BpeModel::merge_lookup(int32_t a, int32_t b) const {
  uint64_t key = pair_key(a, b);
  for (uint64_t h = hash_key(key) & merge_mask_;; h = (h + 1) & merge_mask_) {
    uint64_t k = merge_keys_[h];
    if (k == key) return merge_values_[h];
    if (k == kEmpty) return kEmpty;
  }
}

std::optional<int32_t> BpeModel::token_to_id(std::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return nullptr;
  const std::string& s = id_to_token_[id];
  if (s.empty() && !vocab_.count(s)) return nullptr;
  return &s;
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  bool cacheable = word.size() <= kCacheMaxWord;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t first = ids.size();
  merge_word(word, ids);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() < kCacheCapacity)
      cache_.emplace(std::string(word), std::vector<int32_t>(ids.begin() + first, ids.end()));
  }
}

void BpeModel::merge_word(std::string_view w, std::vector<int32_t>& ids) const {
  // Initial symbols: one per character (with prefix/suffix), byte fallback or unk.
  thread_local std::vector<int32_t> sym;
  sym.clear();
  int32_t pending_unk = -1;  // fuse_unk merges consecutive unknowns
  thread_local std::string lookup;
  for (size_t i = 0; i < w.size();) {
    size_t start = i;
    i += utf8_len(static_cast<unsigned char>(w[i]));
    if (i > w.size()) i = w.size();
    std::string_view ch = w.substr(start, i - start);
    std::string_view key = ch;
    bool affixed = (start != 0 && !continuing_subword_prefix_.empty()) ||
                   (i == w.size() && !end_of_word_suffix_.empty());
    if (affixed) {
      lookup.clear();
      if (start != 0) lookup += continuing_subword_prefix_;
      lookup += ch;
      if (i == w.size()) lookup += end_of_word_suffix_;
      key = lookup;
    }
    auto it = vocab_.find(key);
    if (it != vocab_.end()) {
      if (pending_unk >= 0) {
        sym.push_back(pending_unk);
        pending_unk = -1;
      }
      sym.push_back(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : key) all &= byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all) {
        // As HF: byte tokens go in without flushing a pending unk first.
        for (char c : key) sym.push_back(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (unk_id_) {
      if (pending_unk >= 0 && !fuse_unk_) sym.push_back(pending_unk);
      pending_unk = *unk_id_;
    }
    // Without an unk token HF raises an error; we drop the character instead.
  }
  if (pending_unk >= 0) sym.push_back(pending_unk);

  size_t n = sym.size();
  if (n <= 1) {
    ids.insert(ids.end(), sym.begin(), sym.end());
    return;
  }
  // Doubly linked symbols; the queue orders candidate pairs by (rank, position).
  thread_local std::vector<int32_t> prev, next;
  prev.resize(n);
  next.resize(n);
  for (size_t k = 0; k < n; ++k) {
    prev[k] = static_cast<int32_t>(k) - 1;
    next[k] = k + 1 < n ? static_cast<int32_t>(k + 1) : -1;
  }
  struct Cand {
    uint64_t order;  // rank << 32 | pos: smaller is merged first
    int32_t new_id;
  };
  auto later = [](const Cand& x, const Cand& y) { return x.order > y.order; };  // min-heap
  thread_local std::vector<Cand> heap;
  heap.clear();
  auto push = [&](int32_t pos) {
    int32_t nx = next[pos];
    if (nx < 0) return;
    uint64_t v = merge_lookup(sym[pos], sym[nx]);
    if (v == kEmpty) return;
    heap.push_back({(v & 0xFFFFFFFF00000000ULL) | static_cast<uint32_t>(pos),
                    static_cast<int32_t>(v & 0xFFFFFFFF)});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (size_t k = 0; k + 1 < n; ++k) push(static_cast<int32_t>(k));
  thread_local std::vector<char> alive;
  alive.assign(n, 1);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    Cand top = heap.back();
    heap.pop_back();
    int32_t pos = static_cast<int32_t>(top.order & 0xFFFFFFFF);
    if (!alive[pos]) continue;
    int32_t nx = next[pos];
    if (nx < 0) continue;
    uint64_t v = merge_lookup(sym[pos], sym[nx]);
    // Stale entry: the pair at pos changed since it was queued.
    if (v == kEmpty || (v >> 32) != (top.order >> 32) ||
        static_cast<int32_t>(v & 0xFFFFFFFF) != top.new_id)
      continue;
    sym[pos] = top.new_id;
    alive[nx] = 0;
    next[pos] = next[nx];
    if (next[nx] >= 0) prev[next[nx]] = pos;
    if (prev[pos] >= 0) push(prev[pos]);
    push(pos);
  }
  for (int32_t k = 0; k >= 0; k = next[k]) ids.push_back(sym[k]);
}

}  // namespace lt::tok
