// Arenas of a backend's memory (core/memory.h's Arena over Backend::alloc): one allocation per
// arena, buffers bound by offset. Which memory an arena gets follows its name:
//  - "*_host" (ZeRO-Offload's optimizer, FPDT's store, pipeline staging): pinned host memory;
//  - "offload" (the host store of activation checkpoints): on a host-addressable backend an
//    unlinked memory-mapped file in `offload_dir` (pages leave resident memory between uses),
//    else pinned host memory; the model copies checkpoints in and out asynchronously, no kernel
//    reads it;
//  - everything else: device memory.
#pragma once
#include <string>

#include "backend/backend.h"
#include "core/memory.h"

namespace lt {

Arena make_backend_arena(Backend& be, const std::string& name, size_t bytes,
                         const std::string& offload_dir = "");
// A backend's workspace (Backend::workspace_needs) as plan buffers: "workspace.op" and
// "workspace.gemm" in the arena "workspace".
void plan_workspace(const BackendWorkspace& w, MemoryPlan* plan);
// That arena, allocated and bound to the backend (an empty arena when it needs none); keep it
// alive while the backend runs ops.
Arena bind_workspace_arena(Backend& be, const BackendWorkspace& w);
// True when the arena of this name is host memory on this backend.
bool host_arena(const Backend& be, const std::string& name);

}  // namespace lt
