// Memory of a loop: blocks a thread keeps between calls, carved into arrays.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace seqfast {

// Bytes from which a block goes on transparent huge pages where Linux offers them (`madvise` mode included): one
// fault maps 2 MB instead of 512 pages, and a loop streaming packed weights from L3 misses the TLB far less.
constexpr size_t kHugePageBytes = size_t(2) << 20;

// `bytes` of memory aligned to a cache line, freed with `std::free`, or nullptr.
inline void* alloc_block(size_t bytes) {
#ifdef __linux__
  if (bytes >= kHugePageBytes) {
    const size_t rounded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* p = std::aligned_alloc(kHugePageBytes, rounded);
    if (p) madvise(p, rounded, MADV_HUGEPAGE);
    return p;
  }
#endif
  return std::aligned_alloc(64, (bytes + 63) / 64 * 64);
}

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
      k.p = alloc_block(bytes);
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

// Memory for large tensors (from `kRecycleFromBytes`) from the blocks earlier ones freed, where one of the same size
// waits: glibc hands such blocks back to the system on free, so every call would fault all their pages in afresh (a
// GRU's forward and backward at B = 64, T = 100, H = 256 faulted 60 MB, about 10 ms of its 85 ms). At most
// `kRecycledBlocks` freed blocks of at most `kRecycledBytes` in all wait, the most recently freed kept (no more than
// the process held at once before). A c10 allocator, so its tensors resize as any.
constexpr int64_t kRecycleFromBytes = int64_t(1) << 20;
constexpr size_t kRecycledBlocks = 8;
constexpr size_t kRecycledBytes = size_t(1) << 30;

class Recycler final : public c10::Allocator {
 public:
  // `sizes` of `opts` (on the CPU) with memory from the recycled blocks when large, else at::empty's.
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
    const int64_t bytes = c10::multiply_integers(sizes) * int64_t(c10::elementSize(opts.dtype().toScalarType()));
    if (bytes < kRecycleFromBytes || opts.device().type() != c10::DeviceType::CPU) return at::empty(sizes, opts);
    return at::detail::empty_generic(sizes, &instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     opts.dtype().toScalarType(), c10::nullopt);
  }

  c10::DataPtr allocate(size_t n) override {
    // a header line before the data holds the block's size
    const size_t bytes = kHeader + (n + 63) / 64 * 64;
    void* block = take(bytes);
    *static_cast<size_t*>(block) = bytes;
    return {static_cast<char*>(block) + kHeader, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

 private:
  static constexpr size_t kHeader = 64;
  struct Block {
    void* p;
    size_t bytes;
  };
  static Recycler& instance() {
    static Recycler* r = new Recycler();  // never destroyed: tensors may outlive static destruction
    return *r;
  }
  static void release(void* block) { instance().give(block, *static_cast<size_t*>(block)); }
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = free_.size(); i-- > 0;) {
        if (free_[i].bytes == bytes) {
          void* p = free_[i].p;
          kept_ -= bytes;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          return p;
        }
      }
    }
    void* p = alloc_block(bytes);
    TORCH_CHECK(p, "out of memory allocating ", bytes, " bytes");
    return p;
  }
  void give(void* p, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back({p, bytes});
      kept_ += bytes;
      while (free_.size() > kRecycledBlocks || kept_ > kRecycledBytes) {
        evicted.push_back(free_.front().p);
        kept_ -= free_.front().bytes;
        free_.erase(free_.begin());
      }
    }
    for (void* q : evicted) std::free(q);
  }
  std::mutex mutex_;
  std::vector<Block> free_;
  size_t kept_ = 0;
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
