// Collectives on device buffers over a host communicator, staged through host memory (see
// comm.h): what a device backend does without NCCL (and in a world of one, where they are device
// copies), and how the guarded CPU backend exercises the device paths of the distributed code.
// Its own stats stay zero: the host communicator it stages through counts the traffic (the
// engine sums both).
#include <numeric>

#include "core/check.h"
#include "dist/comm.h"

namespace lt {
namespace {

int64_t total(const std::vector<int64_t>& c) {
  return std::accumulate(c.begin(), c.end(), int64_t{0});
}

class StagedCommunicator final : public Communicator {
 public:
  StagedCommunicator(Communicator& host, Backend& be, std::unique_ptr<Communicator> owned)
      : host_(host), be_(be), owned_(std::move(owned)) {
    name_ = host_.name() + ".staged";
  }
  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  std::string_view backend() const override { return "mpi-staged"; }
  bool device_memory() const override { return true; }

  void allreduce_sum(float* data, size_t n) override {
    if (size() == 1) return;  // a world of one: the float collectives are device copies
    std::vector<float> h = be_.download(data, n);
    host_.allreduce_sum(h.data(), n);
    be_.copy_to_device(data, h.data(), n * 4);
  }
  void allreduce_sum(double* data, size_t n) override { host_.allreduce_sum(data, n); }
  void allreduce_sum(int64_t* data, size_t n) override { host_.allreduce_sum(data, n); }
  void reduce_scatter_sum(float* recv, const float* send,
                          const std::vector<int64_t>& counts) override {
    if (size() == 1) return copy(recv, send, total(counts));
    const std::vector<float> s = be_.download(send, size_t(total(counts)));
    std::vector<float> r(size_t(counts[rank()]));
    host_.reduce_scatter_sum(r.data(), s.data(), counts);
    be_.copy_to_device(recv, r.data(), r.size() * 4);
  }
  void allgather(float* recv, const float* send, const std::vector<int64_t>& counts) override {
    if (size() == 1) return copy(recv, send, total(counts));
    const int64_t at = std::accumulate(counts.begin(), counts.begin() + rank(), int64_t{0});
    std::vector<float> r(size_t(total(counts)));
    const int64_t mine = counts[rank()];
    if (mine) be_.copy_to_host(r.data() + at, send ? send : recv + at, size_t(mine) * 4);
    host_.allgather(r.data(), nullptr, counts);
    be_.copy_to_device(recv, r.data(), r.size() * 4);
  }
  std::unique_ptr<CommRequest> allgather_async(float* recv, const float* send,
                                               const std::vector<int64_t>& counts) override {
    allgather(recv, send, counts);
    return std::make_unique<Done>();
  }
  void alltoall(float* recv, const float* send, size_t n) override {
    if (size() == 1) return copy(recv, send, int64_t(n));
    const std::vector<float> s = be_.download(send, n * size_t(size()));
    std::vector<float> r(s.size());
    host_.alltoall(r.data(), s.data(), n);
    be_.copy_to_device(recv, r.data(), r.size() * 4);
  }
  void send(const float* data, size_t n, int dst, int tag) override {
    const std::vector<float> h = be_.download(data, n);
    host_.send(h.data(), n, dst, tag);
  }
  void recv(float* data, size_t n, int src, int tag) override {
    std::vector<float> h(n);
    host_.recv(h.data(), n, src, tag);
    be_.copy_to_device(data, h.data(), n * 4);
  }
  std::unique_ptr<CommRequest> isend(const float* data, size_t n, int dst, int tag) override {
    auto r = std::make_unique<Staged>();
    r->host = be_.download(data, n);  // the device buffer may change once isend returns
    r->inner = host_.isend(r->host.data(), n, dst, tag);
    return r;
  }
  std::unique_ptr<CommRequest> irecv(float* data, size_t n, int src, int tag) override {
    auto r = std::make_unique<Staged>();
    r->host.resize(n);
    r->inner = host_.irecv(r->host.data(), n, src, tag);
    r->be = &be_;
    r->device = data;
    return r;
  }
  void broadcast(void* data, size_t bytes, int root) override {
    host_.broadcast(data, bytes, root);
  }
  void barrier() override { host_.barrier(); }
  std::unique_ptr<Communicator> split(int color, int key, std::string name) override {
    auto sub = host_.split(color, key, std::move(name));
    Communicator& ref = *sub;
    return std::make_unique<StagedCommunicator>(ref, be_, std::move(sub));
  }

 private:
  struct Done final : CommRequest {
    void wait() override {}
  };
  // A point-to-point call through its host buffer; irecv copies to the device when done.
  struct Staged final : CommRequest {
    ~Staged() override {
      if (inner) Staged::wait();
    }
    void wait() override {
      if (!inner) return;
      inner->wait();
      inner.reset();
      if (device) be->copy_to_device(device, host.data(), host.size() * 4);
    }
    std::vector<float> host;
    std::unique_ptr<CommRequest> inner;
    Backend* be = nullptr;
    float* device = nullptr;
  };
  // A collective of a world of one: send to recv on the device (send null: in place).
  void copy(float* recv, const float* send, int64_t n) {
    if (send && send != recv && n > 0) be_.copy_device(recv, send, size_t(n) * 4);
  }
  Communicator& host_;
  Backend& be_;
  std::unique_ptr<Communicator> owned_;
};

}  // namespace

std::unique_ptr<Communicator> make_staged_communicator(Communicator& host, Backend& be) {
  return std::make_unique<StagedCommunicator>(host, be, nullptr);
}

}  // namespace lt
