// Backend arenas (see arena.h).
#include "backend/arena.h"

namespace lt {

bool host_arena(const Backend& be, const std::string& name) {
  return name.ends_with("_host") || (name == "offload" && !be.host_addressable()) ||
         be.host_addressable();
}

Arena make_backend_arena(Backend& be, const std::string& name, size_t bytes,
                         const std::string& offload_dir) {
  if (name == "offload" && be.host_addressable())
    return Arena::file_backed(name, bytes, offload_dir);
  if (bytes == 0) return Arena::external(name, nullptr, 0, nullptr);
  if (name.ends_with("_host") || name == "offload")
    return Arena::external(name, be.alloc_pinned(bytes), bytes,
                           [&be](void* p) { be.free_pinned(p); });
  return Arena::external(name, be.alloc(bytes), bytes, [&be](void* p) { be.free(p); });
}

}  // namespace lt
