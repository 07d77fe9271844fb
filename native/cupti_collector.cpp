// kvprof._cupti: device time per engine step from the CUPTI Activity API.
//
// libcupti is opened with dlopen at run time (the one matching the user's CUDA,
// chosen by kvprof.recorder.cupti), never linked: the module imports on a machine
// without CUDA. The worker hook pushes an external correlation id (the step + 1)
// around each step's launches; CUPTI delivers kernel, memcpy and memset records in
// buffers on its own thread, where they are summed per (step, name). Python maps
// names to categories (one table, kvprof.recorder.kernels) when it takes the sums.
//
// Only a few fields of each record are read; their offsets are the same in the
// CUDA 12 (CUpti_ActivityKernel9, Memcpy6, Memset4) and CUDA 13 (Kernel13, Memcpy7,
// Memset5) layouts, which the static_asserts below pin for the headers built with.
#include <cupti_activity.h>
#include <cupti_callbacks.h>
#include <cupti_version.h>

#include <dlfcn.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// The fields read, at the offsets shared by CUPTI 12 and 13 (see the header comment).
constexpr size_t kStart = 16, kEnd = 24, kKernelCorr = 92, kKernelName = 104;
constexpr size_t kCopyKind = 4, kCopyCorr = 44, kExtKind = 4, kExtId = 8, kExtCorr = 16;
#if CUPTI_API_VERSION >= 130000
using Kernel = CUpti_ActivityKernel13;
using Memcpy = CUpti_ActivityMemcpy7;
using Memset = CUpti_ActivityMemset5;
#else
using Kernel = CUpti_ActivityKernel9;
using Memcpy = CUpti_ActivityMemcpy6;
using Memset = CUpti_ActivityMemset4;
#endif
static_assert(offsetof(Kernel, start) == kStart && offsetof(Kernel, end) == kEnd, "kernel times");
static_assert(offsetof(Kernel, correlationId) == kKernelCorr && offsetof(Kernel, name) == kKernelName,
              "kernel correlation id / name");
static_assert(offsetof(Memcpy, start) == kStart && offsetof(Memcpy, end) == kEnd &&
                  offsetof(Memcpy, correlationId) == kCopyCorr && offsetof(Memcpy, copyKind) == kCopyKind,
              "memcpy fields");
static_assert(offsetof(Memset, start) == kStart && offsetof(Memset, end) == kEnd &&
                  offsetof(Memset, correlationId) == kCopyCorr,
              "memset fields");
static_assert(offsetof(CUpti_ActivityExternalCorrelation, externalKind) == kExtKind &&
                  offsetof(CUpti_ActivityExternalCorrelation, externalId) == kExtId &&
                  offsetof(CUpti_ActivityExternalCorrelation, correlationId) == kExtCorr,
              "external correlation fields");

constexpr CUpti_ExternalCorrelationKind kExternalKind = CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM0;
// CUPTI writes an external correlation record only beside a runtime or driver API record
// (cupti_activity.h, cuptiActivityPushExternalCorrelationId), so those two kinds are on
// too; their records are only counted. cuBLAS and Triton launch through the driver API.
const CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                     CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION,
                                     CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_DRIVER};

template <typename T>
T field(const uint8_t* record, size_t offset) {
  T value;
  std::memcpy(&value, record + offset, sizeof(T));
  return value;
}

// ------------------------------------------------------------ libcupti, opened at run time
struct Api {
  void* handle = nullptr;
  std::string path;
  CUptiResult (*getVersion)(uint32_t*) = nullptr;
  CUptiResult (*getResultString)(CUptiResult, const char**) = nullptr;
  CUptiResult (*subscribe)(CUpti_SubscriberHandle*, CUpti_CallbackFunc, void*) = nullptr;
  CUptiResult (*unsubscribe)(CUpti_SubscriberHandle) = nullptr;
  CUptiResult (*enable)(CUpti_ActivityKind) = nullptr;
  CUptiResult (*disable)(CUpti_ActivityKind) = nullptr;
  CUptiResult (*registerCallbacks)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc) = nullptr;
  CUptiResult (*getNextRecord)(uint8_t*, size_t, CUpti_Activity**) = nullptr;
  CUptiResult (*getNumDropped)(CUcontext, uint32_t, size_t*) = nullptr;
  CUptiResult (*flushAll)(uint32_t) = nullptr;
  CUptiResult (*flushPeriod)(uint32_t) = nullptr;   // optional (older CUPTI)
  CUptiResult (*push)(CUpti_ExternalCorrelationKind, uint64_t) = nullptr;
  CUptiResult (*pop)(CUpti_ExternalCorrelationKind, uint64_t*) = nullptr;
};
Api api;

std::string message(CUptiResult status) {
  const char* text = nullptr;
  if (api.getResultString && api.getResultString(status, &text) == CUPTI_SUCCESS && text) return text;
  return "CUPTI error " + std::to_string(static_cast<int>(status));
}

void check(CUptiResult status, const char* what) {
  if (status != CUPTI_SUCCESS) throw std::runtime_error(std::string(what) + ": " + message(status));
}

template <typename F>
bool bind(void* handle, F*& target, const char* name) {
  target = reinterpret_cast<F*>(dlsym(handle, name));
  return target != nullptr;
}

// Already loaded (torch's own libcupti) wins: one CUPTI per process.
std::string load(const std::vector<std::string>& candidates) {
  if (api.handle) return api.path;
  std::string tried;
  void* handle = nullptr;
  for (int pass = 0; pass < 2 && !handle; ++pass) {
    for (const auto& path : candidates) {
      handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | (pass == 0 ? RTLD_NOLOAD : 0));
      if (handle) {
        api.path = path;
        break;
      }
      if (pass == 1) {
        const char* err = dlerror();
        tried += "\n  " + path + ": " + (err ? err : "not found");
      }
    }
  }
  if (!handle) throw std::runtime_error("no libcupti could be opened:" + tried);
  bool ok = bind(handle, api.getVersion, "cuptiGetVersion") &&
            bind(handle, api.getResultString, "cuptiGetResultString") &&
            bind(handle, api.subscribe, "cuptiSubscribe") && bind(handle, api.unsubscribe, "cuptiUnsubscribe") &&
            bind(handle, api.enable, "cuptiActivityEnable") && bind(handle, api.disable, "cuptiActivityDisable") &&
            bind(handle, api.registerCallbacks, "cuptiActivityRegisterCallbacks") &&
            bind(handle, api.getNextRecord, "cuptiActivityGetNextRecord") &&
            bind(handle, api.getNumDropped, "cuptiActivityGetNumDroppedRecords") &&
            bind(handle, api.flushAll, "cuptiActivityFlushAll") &&
            bind(handle, api.push, "cuptiActivityPushExternalCorrelationId") &&
            bind(handle, api.pop, "cuptiActivityPopExternalCorrelationId");
  bind(handle, api.flushPeriod, "cuptiActivityFlushPeriod");
  if (!ok) {
    dlclose(handle);
    api = Api();
    throw std::runtime_error("libcupti lacks a function kvprof needs (too old a CUPTI?)");
  }
  api.handle = handle;
  return api.path;
}

// ------------------------------------------------------------ sums, filled on CUPTI's thread
struct Sum {
  uint64_t ns = 0;
  uint64_t count = 0;
};
struct Loose {   // a record whose step is not known yet (its correlation record may come later)
  uint32_t corr;
  int name;
  uint64_t ns;
  int age;
};

struct State {
  std::mutex mu;
  std::unordered_map<std::string, int> name_ids;
  std::vector<std::string> names;
  size_t names_taken = 0;
  std::unordered_map<uint32_t, std::pair<uint64_t, int>> steps_of;   // correlation id -> (ext id, age)
  std::map<std::pair<uint64_t, int>, Sum> sums;                      // (ext id, name id) -> sum
  std::vector<Loose> loose;
  Sum outside;            // records no step claimed (launched outside the hooks)
  uint64_t records = 0, buffers = 0, dropped = 0;
  bool running = false;
  size_t buffer_bytes = 1 << 20;
} state;

int name_id(const std::string& name) {
  auto it = state.name_ids.find(name);
  if (it != state.name_ids.end()) return it->second;
  int id = static_cast<int>(state.names.size());
  state.names.push_back(name);
  state.name_ids.emplace(name, id);
  return id;
}

const char* copy_name(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "[memcpy HtoD]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "[memcpy DtoH]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "[memcpy DtoD]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP: return "[memcpy PtoP]";
    default: return "[memcpy other]";
  }
}

void add(uint32_t corr, int name, uint64_t ns) {
  auto it = state.steps_of.find(corr);
  if (it == state.steps_of.end()) {
    state.loose.push_back({corr, name, ns, 0});
    return;
  }
  Sum& s = state.sums[{it->second.first, name}];
  s.ns += ns;
  s.count += 1;
}

void consume(const uint8_t* rec) {
  auto kind = static_cast<CUpti_ActivityKind>(field<uint32_t>(rec, 0));
  state.records += 1;
  switch (kind) {
    case CUPTI_ACTIVITY_KIND_KERNEL:
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
      const char* name = field<const char*>(rec, kKernelName);
      uint64_t ns = field<uint64_t>(rec, kEnd) - field<uint64_t>(rec, kStart);
      add(field<uint32_t>(rec, kKernelCorr), name_id(name ? name : "[unnamed kernel]"), ns);
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY:
      add(field<uint32_t>(rec, kCopyCorr), name_id(copy_name(field<uint8_t>(rec, kCopyKind))),
          field<uint64_t>(rec, kEnd) - field<uint64_t>(rec, kStart));
      break;
    case CUPTI_ACTIVITY_KIND_MEMSET:
      add(field<uint32_t>(rec, kCopyCorr), name_id("[memset]"),
          field<uint64_t>(rec, kEnd) - field<uint64_t>(rec, kStart));
      break;
    case CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION:
      if (field<uint32_t>(rec, kExtKind) == kExternalKind)
        state.steps_of[field<uint32_t>(rec, kExtCorr)] = {field<uint64_t>(rec, kExtId), 0};
      break;
    default:
      break;
  }
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = state.buffer_bytes;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, state.buffer_bytes));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t, size_t valid) {
  {
    std::lock_guard<std::mutex> lock(state.mu);
    CUpti_Activity* record = nullptr;
    while (api.getNextRecord(buffer, valid, &record) == CUPTI_SUCCESS)
      consume(reinterpret_cast<const uint8_t*>(record));
    size_t dropped = 0;
    if (api.getNumDropped(ctx, stream, &dropped) == CUPTI_SUCCESS) state.dropped += dropped;
    state.buffers += 1;
  }
  std::free(buffer);
}

// ------------------------------------------------------------ what Python calls
void CUPTIAPI no_op(void*, CUpti_CallbackDomain, CUpti_CallbackId, const void*) {}

// True when another CUPTI client (the torch profiler) holds the one subscriber slot.
bool other_subscriber() {
  CUpti_SubscriberHandle probe;
  CUptiResult status = api.subscribe(&probe, no_op, nullptr);
  if (status == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED) return true;
  check(status, "cuptiSubscribe");
  api.unsubscribe(probe);   // the slot stays free for a profiler started later
  return false;
}

void start(size_t buffer_bytes, uint32_t flush_period_ms) {
  if (!api.handle) throw std::runtime_error("libcupti is not loaded");
  if (state.running) return;
  {   // a new session (a second trace in this process): nothing carried over but the names,
      // which the next take() sends again from the first
    std::lock_guard<std::mutex> lock(state.mu);
    state.steps_of.clear();
    state.sums.clear();
    state.loose.clear();
    state.outside = Sum();
    state.records = state.buffers = state.dropped = 0;
    state.names_taken = 0;
  }
  state.buffer_bytes = buffer_bytes;
  check(api.registerCallbacks(buffer_requested, buffer_completed), "cuptiActivityRegisterCallbacks");
  size_t enabled = 0;
  try {
    for (CUpti_ActivityKind kind : kKinds) {
      check(api.enable(kind), "cuptiActivityEnable");
      ++enabled;
    }
  } catch (...) {
    for (size_t i = 0; i < enabled; ++i) api.disable(kKinds[i]);
    throw;
  }
  if (flush_period_ms && api.flushPeriod) api.flushPeriod(flush_period_ms);
  state.running = true;
}

void stop() {
  if (!state.running) return;
  state.running = false;
  for (CUpti_ActivityKind kind : kKinds) api.disable(kind);
  if (api.flushPeriod) api.flushPeriod(0);
  py::gil_scoped_release release;
  api.flushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
}

void push(uint64_t id) { api.push(kExternalKind, id); }

void pop() {
  uint64_t id = 0;
  api.pop(kExternalKind, &id);
}

void flush(bool forced) {
  if (!api.handle) return;
  py::gil_scoped_release release;   // CUPTI's callback may run on this thread
  api.flushAll(forced ? CUPTI_ACTIVITY_FLAG_FLUSH_FORCED : 0);
}

// Loose records get `patience` more takes for their correlation record to arrive;
// correlation entries live as long (a graph launch has one id for many kernels).
py::tuple take(int patience) {
  std::vector<std::tuple<uint64_t, int, uint64_t, uint64_t>> rows;
  std::vector<std::string> new_names;
  py::dict stats;
  {
    std::lock_guard<std::mutex> lock(state.mu);
    std::vector<Loose> still;
    for (Loose& l : state.loose) {
      auto it = state.steps_of.find(l.corr);
      if (it != state.steps_of.end()) {
        Sum& s = state.sums[{it->second.first, l.name}];
        s.ns += l.ns;
        s.count += 1;
      } else if (++l.age > patience) {
        state.outside.ns += l.ns;
        state.outside.count += 1;
      } else {
        still.push_back(l);
      }
    }
    state.loose.swap(still);
    for (auto it = state.steps_of.begin(); it != state.steps_of.end();)
      it = (++it->second.second > patience) ? state.steps_of.erase(it) : std::next(it);
    rows.reserve(state.sums.size());
    for (const auto& [key, s] : state.sums) rows.emplace_back(key.first, key.second, s.ns, s.count);
    state.sums.clear();
    new_names.assign(state.names.begin() + state.names_taken, state.names.end());
    state.names_taken = state.names.size();
    stats["records"] = state.records;
    stats["buffers"] = state.buffers;
    stats["dropped"] = state.dropped;
    stats["outside_ns"] = state.outside.ns;
    stats["outside_records"] = state.outside.count;
    stats["loose"] = state.loose.size();
  }
  return py::make_tuple(rows, new_names, stats);
}

uint32_t runtime_version() {
  uint32_t version = 0;
  if (api.getVersion) check(api.getVersion(&version), "cuptiGetVersion");
  return version;
}

}  // namespace

PYBIND11_MODULE(_cupti, m) {
  m.doc() = "kvprof's CUPTI Activity collector (libcupti opened at run time)";
  m.attr("COMPILED_API_VERSION") = CUPTI_API_VERSION;
  m.def("load", &load, py::arg("candidates"), "Open the first libcupti that opens; returns its path");
  m.def("loaded", []() { return api.handle != nullptr; });
  m.def("runtime_version", &runtime_version);
  m.def("other_subscriber", &other_subscriber);
  m.def("start", &start, py::arg("buffer_bytes") = 1 << 20, py::arg("flush_period_ms") = 0);
  m.def("stop", &stop);
  m.def("push", &push, py::arg("external_id"));
  m.def("pop", &pop);
  m.def("flush", &flush, py::arg("forced") = false);
  m.def("take", &take, py::arg("patience") = 2,
        "(rows of (external id, name id, ns, count), names new since the last take, counters)");
}
