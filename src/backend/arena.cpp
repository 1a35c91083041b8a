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

void plan_workspace(const BackendWorkspace& w, MemoryPlan* plan) {
  if (w.op_bytes) plan->add("workspace.op", w.op_bytes, MemCategory::kScratch, "workspace");
  if (w.gemm_bytes) plan->add("workspace.gemm", w.gemm_bytes, MemCategory::kScratch, "workspace");
  if (w.held_bytes)
    plan->add("workspace.gemm_held", w.held_bytes, MemCategory::kScratch, "workspace");
}

Arena bind_workspace_arena(Backend& be, const BackendWorkspace& w) {
  if (w.op_bytes + w.gemm_bytes + w.held_bytes == 0) return Arena();
  MemoryPlan plan;
  plan_workspace(w, &plan);
  Arena a = make_backend_arena(be, "workspace", plan.arena_bytes("workspace"));
  void* op = w.op_bytes ? a.take_bytes("workspace.op", w.op_bytes) : nullptr;
  void* gemm = w.gemm_bytes ? a.take_bytes("workspace.gemm", w.gemm_bytes) : nullptr;
  void* held = w.held_bytes ? a.take_bytes("workspace.gemm_held", w.held_bytes) : nullptr;
  be.bind_workspace(op, w.op_bytes, gemm, w.gemm_bytes, held, w.held_bytes);
  return a;
}

}  // namespace lt
