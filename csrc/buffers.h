// Memory of a loop: blocks a thread keeps between calls, carved into arrays.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>

namespace seqfast {

// Memory up to this size a calling thread keeps between calls, per use (packed weights; a loop's state buffers).
constexpr int64_t kKeepBytes = int64_t(32) << 20;

// `n` elements of `T` for one call. Up to `kKeepBytes` they live in a block the calling thread keeps for its next call
// of the same `Use`, so repeated calls neither allocate nor fault fresh pages in (glibc hands large freed blocks back
// to the system); a larger request, or one while the thread's block is in use, gets its own allocation.
enum class Use { kPackedWeights, kLoopState };

template <Use use, typename T>
class KeptBuffer {
 public:
  explicit KeptBuffer(int64_t n) {
    Kept& k = kept();
    const int64_t bytes = n * int64_t(sizeof(T));
    if (k.busy || bytes > kKeepBytes) {
      own_ = at::empty({bytes}, at::kByte);
      data_ = reinterpret_cast<T*>(own_.data_ptr<uint8_t>());
      return;
    }
    if (bytes > k.bytes) {
      std::free(k.p);
      k.p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      k.bytes = k.p ? bytes : 0;
      TORCH_CHECK(k.p, "out of memory allocating ", bytes, " bytes");
    }
    k.busy = true;
    kept_ = &k;
    data_ = static_cast<T*>(k.p);
  }
  ~KeptBuffer() {
    if (kept_) kept_->busy = false;
  }
  KeptBuffer(const KeptBuffer&) = delete;
  KeptBuffer& operator=(const KeptBuffer&) = delete;
  T* data() const { return data_; }

 private:
  struct Kept {
    void* p = nullptr;
    int64_t bytes = 0;
    bool busy = false;
    ~Kept() { std::free(p); }
  };
  static Kept& kept() {
    thread_local Kept k;
    return k;
  }
  Kept* kept_ = nullptr;
  T* data_ = nullptr;
  at::Tensor own_;
};

// Consecutive arrays carved from one block: `take(n)` returns the next `n` elements.
template <typename T>
class Carve {
 public:
  explicit Carve(T* p) : p_(p) {}
  T* take(int64_t n) {
    T* q = p_;
    p_ += n;
    return q;
  }

 private:
  T* p_;
};

}  // namespace seqfast
