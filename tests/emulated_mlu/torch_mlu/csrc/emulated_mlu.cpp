// Emulated Cambricon MLU for tests: PyTorch's PrivateUse1 backend (renamed to
// "mlu" from Python) backed by host memory. Only storage, views, copies and
// the device guard are native; every other op runs through a boxed CPU
// fallback, so numerics are exactly those of the CPU kernels.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

// EMULATED_MLU_LEGACY_TORCH is defined (by _extension.py) for torch before 2.4, whose
// allocator, device-guard and PrivateUse1-hooks interfaces are narrower; verified on 2.1.
#ifdef EMULATED_MLU_LEGACY_TORCH
#define EMU_NEW_API(...)
#define EMU_NEW_OVERRIDE
#define EMU_NOEXCEPT noexcept
#else
#define EMU_NEW_API(...) __VA_ARGS__
#define EMU_NEW_OVERRIDE override
#define EMU_NOEXCEPT
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace {

constexpr c10::DeviceType kMlu = c10::DeviceType::PrivateUse1;
constexpr int kMaxDevices = 16;

// Set from Python (EMULATED_MLU_DEVICE_COUNT / *_VISIBLE_DEVICES) at import.
std::atomic<int> g_device_count{2};
// Per thread, like CUDA: autograd's per-device worker threads set their own.
thread_local c10::DeviceIndex t_current_device = 0;

std::atomic<int64_t> g_allocated[kMaxDevices];
std::atomic<int64_t> g_peak[kMaxDevices];

// ------------------------------------------------------- transfer counters
// What a real device would see cross between host and device: every copy
// (count, bytes, direction, and whether the caller asked for non_blocking),
// every scalar read (.item(), bool(t)), which waits for the device, and every
// explicit synchronization. The emulation's own staging (the CPU fallback
// moving an op's operands to host and back, the cncl process group) happens
// inside an InternalScope and is not counted: a real MLU does not do it.

enum Traffic : int {
  kH2DCopies,
  kH2DBytes,
  kH2DBlocking,
  kD2HCopies,
  kD2HBytes,
  kD2HBlocking,
  kScalarReads,
  kSyncCalls,
  kTrafficCount,
};
std::atomic<int64_t> g_traffic[kTrafficCount];
thread_local int t_internal_depth = 0;

struct InternalScope {
  InternalScope() { ++t_internal_depth; }
  ~InternalScope() { --t_internal_depth; }
};

void count_copy(const at::Tensor& src, const at::Tensor& dst, bool non_blocking) {
  if (t_internal_depth > 0) return;
  const bool from_host = src.device().is_cpu(), to_host = dst.device().is_cpu();
  if (from_host == to_host) return;  // host to host, or device to device
  // Bytes on the wire: a dtype conversion can run on either side of the
  // copy, so the narrower of the two is what has to cross.
  const int64_t bytes = std::min(src.numel() * src.element_size(),
                                 dst.numel() * dst.element_size());
  g_traffic[from_host ? kH2DCopies : kD2HCopies] += 1;
  g_traffic[from_host ? kH2DBytes : kD2HBytes] += bytes;
  if (!non_blocking) g_traffic[from_host ? kH2DBlocking : kD2HBlocking] += 1;
}

void count_sync() {
  if (t_internal_depth == 0) g_traffic[kSyncCalls] += 1;
}

// ---------------------------------------------------------------- allocator

struct Block {
  void* ptr;
  size_t nbytes;
  c10::DeviceIndex device;
};

void free_block(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  g_allocated[block->device] -= static_cast<int64_t>(block->nbytes);
  c10::free_cpu(block->ptr);
  delete block;
}

// Host memory stands in for device memory. The byte counts make
// torch.mlu.memory_allocated() report real numbers for the emulated device.
struct MluAllocator final : c10::Allocator {
#ifdef EMULATED_MLU_LEGACY_TORCH
  c10::DataPtr allocate(size_t nbytes) const override {
#else
  c10::DataPtr allocate(size_t nbytes) override {
#endif
    const c10::DeviceIndex device = t_current_device;
    void* ptr = nbytes ? c10::alloc_cpu(nbytes) : nullptr;
    if (ptr == nullptr) {
      return {nullptr, nullptr, &c10::detail::deleteNothing, c10::Device(kMlu, device)};
    }
    const int64_t now = g_allocated[device] += static_cast<int64_t>(nbytes);
    int64_t peak = g_peak[device].load();
    while (now > peak && !g_peak[device].compare_exchange_weak(peak, now)) {
    }
    return {ptr, new Block{ptr, nbytes, device}, &free_block,
            c10::Device(kMlu, device)};
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return nullptr;  // the context (Block) is not the data pointer
  }
  EMU_NEW_API(void copy_data(void* dst, const void* src, std::size_t n) const override {
    default_copy_data(dst, src, n);
  })
};

MluAllocator g_allocator;
// Storage constructors (torch.UntypedStorage(n, device="mlu"), torch.load)
// look the allocator up by device type instead of going through empty().
REGISTER_ALLOCATOR(kMlu, &g_allocator);

// ------------------------------------------------------------- device guard

struct MluGuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kMlu; }
  c10::Device exchangeDevice(c10::Device d) const override {
    const c10::Device old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override {
    return c10::Device(kMlu, t_current_device);
  }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.type() == kMlu, "expected an mlu device, got ", d);
    TORCH_CHECK(d.index() < g_device_count.load(), "mlu:", int(d.index()),
                " is out of range (device_count=", g_device_count.load(), ")");
    if (d.index() >= 0) t_current_device = d.index();
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (d.index() >= 0) t_current_device = d.index();
  }
  // Everything is synchronous, so one default stream per device suffices.
  c10::Stream getStream(c10::Device d) const EMU_NOEXCEPT override {
    return c10::Stream(c10::Stream::DEFAULT, d);
  }
  c10::Stream getDefaultStream(c10::Device d) const override { return getStream(d); }
  c10::Stream getStreamFromGlobalPool(c10::Device d, bool) const override {
    return getStream(d);
  }
  EMU_NEW_API(c10::Stream getNewStream(c10::Device d, int) const override { return getStream(d); })
  c10::Stream exchangeStream(c10::Stream s) const EMU_NOEXCEPT override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override {
    return static_cast<c10::DeviceIndex>(g_device_count.load());
  }
  // Events hold the host time at which they were recorded: with synchronous
  // kernels that is when the preceding work finished, so timings are real.
  void record(void** event, const c10::Stream&, const c10::DeviceIndex,
              const c10::EventFlag) const override {
    if (*event == nullptr) *event = new std::chrono::steady_clock::time_point();
    *static_cast<std::chrono::steady_clock::time_point*>(*event) =
        std::chrono::steady_clock::now();
  }
  void destroyEvent(void* event, const c10::DeviceIndex) const noexcept override {
    delete static_cast<std::chrono::steady_clock::time_point*>(event);
  }
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void synchronizeEvent(void*) const EMU_NEW_OVERRIDE { count_sync(); }
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override { count_sync(); }
  void synchronizeDevice(const c10::DeviceIndex) const EMU_NEW_OVERRIDE { count_sync(); }
  double elapsedTime(void* start, void* end, const c10::DeviceIndex) const EMU_NEW_OVERRIDE {
    TORCH_CHECK(start && end, "both events must be recorded before elapsed_time()");
    using TP = std::chrono::steady_clock::time_point;
    return std::chrono::duration<double, std::milli>(*static_cast<TP*>(end) -
                                                     *static_cast<TP*>(start))
        .count();
  }
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, MluGuardImpl);

// ------------------------------------------------------------------- hooks

struct MluHooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const EMU_NEW_OVERRIDE { return true; }
  bool isAvailable() const EMU_NEW_OVERRIDE { return g_device_count.load() > 0; }
  bool hasPrimaryContext(c10::DeviceIndex) const EMU_NEW_OVERRIDE { return true; }
  at::Device getDeviceFromPtr(void*) const override {
    return c10::Device(kMlu, t_current_device);
  }
  // Pinning has no meaning for host memory; hand out ordinary CPU memory.
  c10::Allocator* getPinnedMemoryAllocator() const EMU_NEW_OVERRIDE {
    return c10::GetCPUAllocator();
  }
  // Reached by UntypedStorage.resize_(); the CPU routine reallocates through
  // the storage's own allocator, which is ours.
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t n) const EMU_NEW_OVERRIDE {
    c10::DeviceGuard guard(storage.device());
    at::native::resize_bytes_cpu(storage.unsafeGetStorageImpl(), n);
  }
};

// ----------------------------------------------------------------- kernels

// A CPU tensor viewing the same bytes: device memory *is* host memory here.
at::Tensor host_alias(const at::Tensor& t) {
  if (t.device().is_cpu()) return t;
  return at::from_blob(
      t.data_ptr(), t.sizes(), t.strides(), [keep = t](void*) {},
      t.options().device(at::kCPU));
}

at::Tensor empty_memory_format(c10::IntArrayRef size,
                               c10::optional<at::ScalarType> dtype,
                               c10::optional<at::Layout>,
                               c10::optional<at::Device> device,
                               c10::optional<bool>,
                               c10::optional<at::MemoryFormat> memory_format) {
  const c10::OptionalDeviceGuard guard(device);
  return at::detail::empty_generic(size, &g_allocator,
                                   c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride,
                         c10::optional<at::ScalarType> dtype,
                         c10::optional<at::Layout>,
                         c10::optional<at::Device> device, c10::optional<bool>) {
  const c10::OptionalDeviceGuard guard(device);
  return at::detail::empty_strided_generic(
      size, stride, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
      c10::dtype_or_default(dtype));
}

// NOTE: the MLU stores and computes float64 as float32 (torch_mlu aten/utils/types.cpp maps
// kDouble to CNNL_DTYPE_FLOAT). Every value that lands in a float64 tensor on the device,
// from the host or as an op's result (the fallback copies results back through here),
// is rounded to float32, so sums that rely on float64's 53 bits lose them as on the card.
at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  count_copy(self, dst, non_blocking);
  auto out = host_alias(dst);
  out.copy_(host_alias(self));
  if (dst.device().type() == kMlu && dst.scalar_type() == at::kDouble) {
    out.copy_(out.to(at::kFloat));
  }
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  // The fallback uses this to write CPU results into out= arguments.
  if (dst.sizes() != self.sizes()) dst.resize_(self.sizes());
  return copy_from(self, dst, /*non_blocking=*/false);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          c10::optional<at::MemoryFormat> memory_format) {
  // The CPU resize reallocates via the storage's allocator (ours); the guard
  // makes the new block land on the tensor's own device index.
  const c10::DeviceGuard guard(self.device());
  return at::native::resize_(self, size, memory_format);
}

at::Tensor& set_storage(at::Tensor& self, at::Storage source, int64_t offset,
                        c10::IntArrayRef size, c10::IntArrayRef stride) {
  const c10::DeviceGuard guard(self.device());
  return at::native::set_storage_cpu_(self, std::move(source), offset, size, stride);
}

at::Scalar local_scalar_dense(const at::Tensor& self) {
  if (t_internal_depth == 0) {
    g_traffic[kScalarReads] += 1;
    g_traffic[kD2HBytes] += self.element_size();
  }
  return at::_local_scalar_dense(host_alias(self));
}

// module.to("mlu") assigns param.data = moved; without this PyTorch refuses
// to shallow-copy across cpu<->mlu and swaps in new Parameter objects, which
// strands optimizers built before the move on the old CPU tensors.
bool has_compatible_shallow_copy_type(const at::Tensor& self, const at::Tensor& from) {
  auto host_like = [](const at::Tensor& t) {
    return t.layout() == at::kStrided && (t.is_cpu() || t.device().type() == kMlu);
  };
  return host_like(self) && host_like(from);
}

// native_batch_norm updates running_mean/var in place although its schema
// does not mark them mutable, so the boxed fallback would update host copies
// and drop the result. Running the CPU kernel on aliases of the device memory
// updates the real buffers.
std::tuple<at::Tensor, at::Tensor, at::Tensor> native_batch_norm(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum,
    double eps) {
  const InternalScope internal;
  auto alias = [](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
    if (!t.has_value() || !t->defined()) return t;
    return host_alias(*t);
  };
  auto host_input = host_alias(input);
#ifdef EMULATED_MLU_LEGACY_TORCH
  // torch 2.1's CPU batch norm has no fp16 kernel; the card's has (autocast leaves batch norm
  // to run in the input's dtype): computed in fp32, the output rounded back to fp16.
  if (host_input.scalar_type() == at::kHalf) host_input = host_input.to(at::kFloat);
#endif
  auto [out, mean, invstd] =
      at::native_batch_norm(host_input, alias(weight), alias(bias),
                            alias(running_mean), alias(running_var), training, momentum, eps);
  return {out.to(input.device(), input.scalar_type()), mean.to(input.device()), invstd.to(input.device())};
}

// ------------------------------------------------------------------ RNG
// NOTE: MLU kernels draw from per-device MLU generators (torch_mlu/mlu/random.py,
// torch.mlu.default_generators), not from the CPU's. Random ops here run as CPU kernels,
// so the fallback lends the CPU default generator the MLU generator's state for the call
// and takes the advanced state back: torch.mlu.manual_seed and friends then really decide
// the device's random numbers, and seeding only the CPU generator does not.

constexpr uint64_t kDefaultSeed = 67280421310721ULL;  // torch.cuda's default seed
std::mutex g_rng_mutex;
std::array<c10::optional<at::Generator>, kMaxDevices> g_generators;

at::Generator& mlu_generator(c10::DeviceIndex device) {
  auto& slot = g_generators[device];
  if (!slot.has_value()) slot = at::make_generator<at::CPUGeneratorImpl>(kDefaultSeed);
  return *slot;
}

c10::DeviceIndex device_of(const c10::OperatorHandle& op, const torch::jit::Stack* stack) {
  const auto num_args = op.schema().arguments().size();
  for (auto i = stack->size() - num_args; i < stack->size(); ++i) {
    const auto& value = (*stack)[i];
    if (value.isTensor() && value.toTensor().defined() && value.toTensor().device().type() == kMlu) {
      return value.toTensor().device().index();
    }
  }
  return t_current_device;
}

// Ops the real card has no MLU kernel for (not in torch_mlu's codegen/mlu_functions.yaml):
// torch_mlu's MLUFallback.cpp runs them on the CPU after warning once per op. Every other op
// is treated as native here, so it falls back silently.
const std::set<std::string> kNoMluKernel = {"aten::_fused_sgd_", "aten::_fused_sgd", "aten::_fused_adam_",
                                            "aten::_fused_adamw_"};
std::mutex g_warned_mutex;
std::set<std::string> g_warned;

void warn_if_no_kernel(const c10::OperatorHandle& op) {
  const auto& name = op.schema().operator_name().name;
  if (kNoMluKernel.count(name) == 0) return;
  std::lock_guard<std::mutex> lock(g_warned_mutex);
  if (!g_warned.insert(name).second) return;
  TORCH_WARN("The operator '", op.schema().operator_name(), "' is not currently supported ",
             "on the MLU backend and will fall back to run on the CPU.",
             " This may have performance implications.");
}

#ifdef EMULATED_MLU_LEGACY_TORCH
// torch 2.1's CPU kernels lack fp16 for many ops the card runs in fp16 under autocast
// (pooling, activations, their backwards). Such a call is rerun in fp32 and its results
// rounded back to fp16, where every floating-point tensor argument is fp16 (then the card's
// results are fp16 too). Arguments written in place (`out=` tensors: on the device, torch
// 2.1 runs structured ops such as max_pool2d through their out= variant) get the fp32
// results copied back into them, and the op returns them.
bool all_floating_half(const std::vector<c10::IValue>& args) {
  bool any = false;
  for (const auto& value : args) {
    if (value.isTensorList()) return false;
    if (!value.isTensor() || !value.toTensor().defined()) continue;
    const auto type = value.toTensor().scalar_type();
    if (!at::isFloatingType(type)) continue;
    if (type != at::kHalf) return false;
    any = true;
  }
  return any;
}

bool is_half(const c10::IValue& value) {
  return value.isTensor() && value.toTensor().defined() && value.toTensor().scalar_type() == at::kHalf;
}

void cpu_fallback_half_in_fp32(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto num_args = schema.arguments().size();
  const std::vector<c10::IValue> args(stack->end() - num_args, stack->end());
  try {
    at::native::cpu_fallback(op, stack);
    return;
  } catch (const c10::Error& err) {
    if (std::string(err.what()).find("not implemented for 'Half'") == std::string::npos || !all_floating_half(args)) {
      throw;
    }
  }
  stack->resize(stack->size() - std::min(stack->size(), num_args));
  std::vector<c10::IValue> converted;
  for (const auto& value : args) converted.emplace_back(is_half(value) ? value.toTensor().to(at::kFloat) : value);
  for (const auto& value : converted) stack->push_back(value);
  at::native::cpu_fallback(op, stack);
  for (size_t j = 0; j < num_args; ++j) {
    const auto* info = schema.arguments()[j].alias_info();
    if (info != nullptr && info->isWrite() && is_half(args[j])) args[j].toTensor().copy_(converted[j].toTensor());
  }
  const auto num_returns = schema.returns().size();
  for (size_t k = 0; k < num_returns; ++k) {
    auto& value = (*stack)[stack->size() - num_returns + k];
    const auto* info = schema.returns()[k].alias_info();
    bool aliased = false;
    for (size_t j = 0; info != nullptr && j < num_args && !aliased; ++j) {
      const auto* arg_info = schema.arguments()[j].alias_info();
      if (arg_info != nullptr && arg_info->beforeSets() == info->beforeSets()) {
        value = args[j];
        aliased = true;
      }
    }
    if (!aliased && value.isTensor() && value.toTensor().defined() && value.toTensor().scalar_type() == at::kFloat) {
      value = value.toTensor().to(at::kHalf);
    }
  }
}
#define EMULATED_MLU_CPU_FALLBACK cpu_fallback_half_in_fp32
#else
#define EMULATED_MLU_CPU_FALLBACK at::native::cpu_fallback
#endif

void mlu_cpu_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const InternalScope internal;
  warn_if_no_kernel(op);
  if (!op.hasTag(at::Tag::nondeterministic_seeded)) {
    EMULATED_MLU_CPU_FALLBACK(op, stack);
    return;
  }
  const c10::DeviceIndex device = device_of(op, stack);
  std::lock_guard<std::mutex> lock(g_rng_mutex);
  auto cpu = at::detail::getDefaultCPUGenerator();
  at::Tensor saved;
  {
    std::lock_guard<std::mutex> gen_lock(cpu.mutex());
    saved = cpu.get_state();
    cpu.set_state(mlu_generator(device).get_state());
  }
  auto restore = [&] {
    std::lock_guard<std::mutex> gen_lock(cpu.mutex());
    mlu_generator(device).set_state(cpu.get_state());
    cpu.set_state(saved);
  };
  try {
    EMULATED_MLU_CPU_FALLBACK(op, stack);
  } catch (...) {
    restore();
    throw;
  }
  restore();
}

// Convolutions with fp16 operands: the CPU has no fast fp16 convolution (its
// reference kernel is tens of times slower than fp32), while a real MLU runs
// them natively and accumulates in fp32. Computing in fp32 and rounding the
// results to fp16 keeps the device's numerics and the test suite's runtime.
void mlu_conv_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const InternalScope internal;
  const auto num_args = op.schema().arguments().size();
  bool half = false;
  for (auto i = stack->size() - num_args; i < stack->size(); ++i) {
    auto& value = (*stack)[i];
    if (value.isTensor() && value.toTensor().defined() &&
        value.toTensor().scalar_type() == at::kHalf) {
      half = true;
      value = value.toTensor().to(at::kFloat);
    }
  }
  at::native::cpu_fallback(op, stack);
  if (!half) return;
  const auto num_returns = op.schema().returns().size();
  for (auto i = stack->size() - num_returns; i < stack->size(); ++i) {
    auto& value = (*stack)[i];
    if (value.isTensor() && value.toTensor().defined() &&
        value.toTensor().scalar_type() == at::kFloat) {
      value = value.toTensor().to(at::kHalf);
    }
  }
}

#ifdef EMULATED_MLU_LEGACY_TORCH
// The backward of an fp16 batch norm: in fp32 as the forward (above). Only the input's
// gradient follows the input's dtype; the weight's and bias's keep the parameters' fp32.
void mlu_half_batch_norm_backward(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const InternalScope internal;
  const auto num_args = op.schema().arguments().size();
  bool half = false;
  for (auto i = stack->size() - num_args; i < stack->size(); ++i) {
    auto& value = (*stack)[i];
    if (value.isTensor() && value.toTensor().defined() && value.toTensor().scalar_type() == at::kHalf) {
      half = true;
      value = value.toTensor().to(at::kFloat);
    }
  }
  at::native::cpu_fallback(op, stack);
  const auto num_returns = op.schema().returns().size();
  auto& grad_input = (*stack)[stack->size() - num_returns];
  if (half && grad_input.isTensor() && grad_input.toTensor().defined()) {
    grad_input = grad_input.toTensor().to(at::kHalf);
  }
}

// torch 2.1 has the loss scaler's two kernels for CUDA only (the CPU got them in 2.3), so
// the fallback has nothing to run: they are written here, on host aliases of device memory.
void amp_non_finite_check_and_unscale(at::TensorList grads, at::Tensor& found_inf,
                                      const at::Tensor& inv_scale) {
  const InternalScope internal;
  auto found = host_alias(found_inf);
  const auto inv = host_alias(inv_scale);
  for (const auto& grad : grads) {
    auto g = host_alias(grad);
    if (!g.isfinite().all().item<bool>()) found.fill_(1.0);
    g.mul_(inv.to(g.scalar_type()));
  }
}

at::Tensor& amp_update_scale(at::Tensor& scale, at::Tensor& growth_tracker, const at::Tensor& found_inf,
                             double growth_factor, double backoff_factor, int64_t growth_interval) {
  const InternalScope internal;
  auto s = host_alias(scale);
  auto tracker = host_alias(growth_tracker);
  if (host_alias(found_inf).item<float>() > 0) {
    s.mul_(backoff_factor);
    tracker.fill_(0);
  } else {
    const auto successful = tracker.item<int>() + 1;
    if (successful == growth_interval) {
      s.mul_(growth_factor);
      tracker.fill_(0);
    } else {
      tracker.fill_(successful);
    }
  }
  return scale;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
#ifdef EMULATED_MLU_LEGACY_TORCH
  m.impl("_amp_foreach_non_finite_check_and_unscale_", amp_non_finite_check_and_unscale);
  m.impl("_amp_update_scale_", amp_update_scale);
#endif
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("as_strided", at::native::as_strided_tensorimpl);
  m.impl("view", at::native::view);
  m.impl("_reshape_alias", at::native::_reshape_alias);
  m.impl("resize_", resize_);
  m.impl("set_.source_Storage", at::native::set_);
  m.impl("set_.source_Storage_storage_offset", set_storage);
  m.impl("set_.source_Tensor", at::native::set_tensor_);
  m.impl("_local_scalar_dense", local_scalar_dense);
  m.impl("_has_compatible_shallow_copy_type", has_compatible_shallow_copy_type);
  m.impl("native_batch_norm", native_batch_norm);
  // convolution's composite kernel would pick convolution_overrideable (which
  // just throws) for an unknown device before any fallback is consulted.
  m.impl("convolution",
         torch::CppFunction::makeFromBoxedFunction<&mlu_conv_fallback>());
  m.impl("convolution_backward",
         torch::CppFunction::makeFromBoxedFunction<&mlu_conv_fallback>());
#ifdef EMULATED_MLU_LEGACY_TORCH
  // torch 2.1's CPU kernels have no fp16 matrix products: computed in fp32 as the convolutions.
  for (const char* name : {"addmm", "mm", "bmm", "baddbmm", "addmv", "mv", "addmm.out", "mm.out", "_softmax",
                           "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&mlu_conv_fallback>());
  }
  m.impl("native_batch_norm_backward",
         torch::CppFunction::makeFromBoxedFunction<&mlu_half_batch_norm_backward>());
#endif
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&mlu_cpu_fallback>());
}

#ifdef EMULATED_MLU_LEGACY_TORCH
// NOTE: torch 2.1 registers no autograd fallthrough for PrivateUse1; torch_mlu registers one
// (torch_mlu/csrc/aten/MLUFallback.cpp), later torch has its own.
TORCH_LIBRARY_IMPL(_, AutogradPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFallthrough());
}
#endif

// Torch registers autocast kernels for CPU/CUDA/XPU/MPS only. Without a
// fallthrough every op (copy_ included) fails on the AutocastPrivateUse1 key
// inside torch.autocast("mlu"); without the lists nothing is cast.
TORCH_LIBRARY_IMPL(_, AutocastPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFallthrough());
}

#define MLU_LOWER_PRECISION(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, lower_precision_fp)
#define MLU_FP32(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, fp32)
#define MLU_FP32_SET_OPT_DTYPE(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, fp32_set_opt_dtype)
#define MLU_PROMOTE(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, promote)

// The op-list macros name Tensor, Scalar, ... unqualified.
namespace at {
namespace {
TORCH_LIBRARY_IMPL(aten, AutocastPrivateUse1, m) {
#ifdef EMULATED_MLU_LEGACY_TORCH
  // torch before 2.4 has no op-list macros in its header, so the list is spelled out here.
  // NOTE: the ops and policies torch_mlu's pt2.1 line registers for AutocastPrivateUse1
  // (torch_mlu/csrc/aten/autocast_mode.cpp on r1.22_pt2.1.0; CUDA's list of torch 2.1), less
  // its three fp32_append_dtype `norm` overloads and its binary_cross_entropy ban.
#define LOW(OP) KERNEL_PRIVATEUSEONE(OP, lower_precision_fp)
#define LOW2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE2(OP, OVERLOAD, lower_precision_fp)
#define F32(OP) KERNEL_PRIVATEUSEONE(OP, fp32)
#define F32_2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE2(OP, OVERLOAD, fp32)
#define OPT(OP) KERNEL_PRIVATEUSEONE(OP, fp32_set_opt_dtype)
#define OPT2(OP, OVERLOAD) KERNEL_PRIVATEUSEONE2(OP, OVERLOAD, fp32_set_opt_dtype)
#define PROMOTE(OP) KERNEL_PRIVATEUSEONE(OP, promote)
  LOW2(_convolution, deprecated) LOW(_convolution) LOW(conv1d) LOW(conv2d) LOW(conv3d) LOW(conv_tbc)
  LOW(conv_transpose1d) LOW2(conv_transpose2d, input) LOW2(conv_transpose3d, input) LOW(convolution)
  LOW(cudnn_convolution) LOW(cudnn_convolution_transpose) LOW(prelu)
  LOW(addmm) LOW(addmv) LOW(addr) LOW(matmul) LOW(einsum) LOW(mm) LOW(mv) LOW(linear)
  LOW(addbmm) LOW(baddbmm) LOW(bmm) LOW(chain_matmul) LOW(linalg_multi_dot)
  LOW(_thnn_fused_lstm_cell) LOW(_thnn_fused_gru_cell) LOW(lstm_cell) LOW(gru_cell)
  LOW(rnn_tanh_cell) LOW(rnn_relu_cell)
  LOW(_scaled_dot_product_flash_attention) LOW(scaled_dot_product_attention)
  F32(acos) F32(asin) F32(cosh) F32(erfinv) F32(exp) F32(expm1) F32(log) F32(log10) F32(log2)
  F32(log1p) F32(reciprocal) F32(rsqrt) F32(sinh) F32(tan)
  F32_2(pow, Tensor_Scalar) F32_2(pow, Tensor_Tensor) F32_2(pow, Scalar) F32(softplus)
  F32(layer_norm) F32(native_layer_norm) F32(group_norm)
  F32_2(frobenius_norm, dim) F32(nuclear_norm) F32_2(nuclear_norm, dim) F32(cosine_similarity)
  F32(poisson_nll_loss) F32(cosine_embedding_loss) F32(nll_loss) F32(nll_loss2d) F32(hinge_embedding_loss)
  F32(kl_div) F32(l1_loss) F32(smooth_l1_loss) F32(huber_loss) F32(mse_loss) F32(margin_ranking_loss)
  F32(multilabel_margin_loss) F32(soft_margin_loss) F32(triplet_margin_loss) F32(multi_margin_loss)
  F32(binary_cross_entropy_with_logits)
  F32(dist) F32(pdist) F32(cdist) F32(renorm) F32(logsumexp)
  OPT(prod) OPT2(prod, dim_int) OPT2(prod, dim_Dimname)
  OPT2(softmax, int) OPT2(softmax, Dimname) OPT2(log_softmax, int) OPT2(log_softmax, Dimname)
  OPT(cumprod) OPT2(cumprod, dimname) OPT(cumsum) OPT2(cumsum, dimname)
  OPT(linalg_vector_norm) OPT(linalg_matrix_norm) OPT2(linalg_matrix_norm, str_ord)
  OPT(sum) OPT2(sum, dim_IntList) OPT2(sum, dim_DimnameList)
  PROMOTE(addcdiv) PROMOTE(addcmul) PROMOTE(atan2) PROMOTE(bilinear) PROMOTE(cross) PROMOTE(dot)
  PROMOTE(grid_sampler) PROMOTE(index_put) PROMOTE(tensordot) PROMOTE(scatter_add)
#undef LOW
#undef LOW2
#undef F32
#undef F32_2
#undef OPT
#undef OPT2
#undef PROMOTE
#else
  AT_FORALL_LOWER_PRECISION_FP(MLU_LOWER_PRECISION)
  AT_FORALL_FP32(MLU_FP32)
  AT_FORALL_FP32_SET_OPT_DTYPE(MLU_FP32_SET_OPT_DTYPE)
  AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE(KERNEL_DIFFERENT_REDISPATCH_SIGNATURE_PRIVATEUSEONE)
  AT_FORALL_PROMOTE(MLU_PROMOTE)
#endif
}
}  // namespace
}  // namespace at

// ------------------------------------------------- control ops for Python
// Exposed as torch.ops.emulated_mlu.* (no pybind11: keeps the cold build short).

namespace {

void check_index(int64_t device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "bad mlu index ", device);
}

void set_device_count(int64_t n) {
  TORCH_CHECK(n >= 0 && n <= kMaxDevices, "device count must be in [0, 16]");
  g_device_count = static_cast<int>(n);
}
int64_t device_count() { return g_device_count.load(); }
int64_t current_device() { return t_current_device; }
void set_device(int64_t device) {
  MluGuardImpl().setDevice(c10::Device(kMlu, static_cast<c10::DeviceIndex>(device)));
}
int64_t memory_allocated(int64_t d) { check_index(d); return g_allocated[d].load(); }
int64_t max_memory_allocated(int64_t d) { check_index(d); return g_peak[d].load(); }
void reset_peak_memory_stats(int64_t d) {
  check_index(d);
  g_peak[d] = g_allocated[d].load();
}

// In Traffic's order: h2d copies, bytes, blocking; d2h copies, bytes,
// blocking; scalar reads; synchronize calls.
std::vector<int64_t> transfer_stats() {
  std::vector<int64_t> out(kTrafficCount);
  for (int i = 0; i < kTrafficCount; ++i) out[i] = g_traffic[i].load();
  return out;
}
void reset_transfer_stats() {
  for (auto& counter : g_traffic) counter = 0;
}
void synchronize() { count_sync(); }

#ifdef EMULATED_MLU_LEGACY_TORCH
// torch before 2.4 asks the device module for its autocast state (torch/amp/autocast_mode.py).
bool autocast_enabled() { return at::autocast::is_privateuseone_enabled(); }
void set_autocast_enabled(bool enabled) { at::autocast::set_privateuseone_enabled(enabled); }
at::ScalarType autocast_dtype() { return at::autocast::get_autocast_privateuseone_dtype(); }
void set_autocast_dtype(at::ScalarType dtype) { at::autocast::set_autocast_privateuseone_dtype(dtype); }
#endif

void manual_seed(int64_t d, int64_t seed) {
  check_index(d);
  std::lock_guard<std::mutex> lock(g_rng_mutex);
  mlu_generator(d).set_current_seed(static_cast<uint64_t>(seed));
}
int64_t initial_seed(int64_t d) {
  check_index(d);
  std::lock_guard<std::mutex> lock(g_rng_mutex);
  return static_cast<int64_t>(mlu_generator(d).current_seed());
}
at::Tensor get_rng_state(int64_t d) {
  check_index(d);
  std::lock_guard<std::mutex> lock(g_rng_mutex);
  return mlu_generator(d).get_state();
}
void set_rng_state(int64_t d, const at::Tensor& state) {
  check_index(d);
  std::lock_guard<std::mutex> lock(g_rng_mutex);
  mlu_generator(d).set_state(state);
}
// Staging that only the emulation does (the cncl group) runs between these.
void begin_internal() { ++t_internal_depth; }
void end_internal() { --t_internal_depth; }

// Runs when the library is loaded, before Python renames PrivateUse1.
const bool g_hooks_registered = [] {
  static MluHooks hooks;
  at::RegisterPrivateUse1HooksInterface(&hooks);
  return true;
}();

}  // namespace

TORCH_LIBRARY(emulated_mlu, m) {
  m.def("set_device_count", set_device_count);
  m.def("device_count", device_count);
  m.def("current_device", current_device);
  m.def("set_device", set_device);
  m.def("memory_allocated", memory_allocated);
  m.def("max_memory_allocated", max_memory_allocated);
  m.def("reset_peak_memory_stats", reset_peak_memory_stats);
  m.def("transfer_stats", transfer_stats);
  m.def("reset_transfer_stats", reset_transfer_stats);
  m.def("synchronize", synchronize);
  m.def("manual_seed", manual_seed);
#ifdef EMULATED_MLU_LEGACY_TORCH
  m.def("autocast_enabled", autocast_enabled);
  m.def("set_autocast_enabled", set_autocast_enabled);
  m.def("autocast_dtype", autocast_dtype);
  m.def("set_autocast_dtype", set_autocast_dtype);
#endif
  m.def("initial_seed", initial_seed);
  m.def("get_rng_state", get_rng_state);
  m.def("set_rng_state", set_rng_state);
  m.def("begin_internal", begin_internal);
  m.def("end_internal", end_internal);
}
