// The phase time accounting of kr_cpu.h (kr_cpu_phase_stats_*): totals per thread slot and kind, added with relaxed
// atomics (each thread adds to its own slot; threads past kSlots share one, which the atomics keep correct).
#include <atomic>
#include <cstdio>

#include "kr_cpu_stack.h"

namespace kr_cpu::phase_stats {

std::atomic<int> g_on{0};

namespace {

constexpr int kSlots = 64;
constexpr int kFields = 3;  // body ns, wait ns, phases

struct alignas(64) Slot {
  std::atomic<int64_t> v[KR_CPU_PHASE_KINDS * kFields];
};

Slot g_slots[kSlots];
std::atomic<int> g_next_slot{0};

int my_slot() {
  thread_local int slot = g_next_slot.fetch_add(1, std::memory_order_relaxed) % kSlots;
  return slot;
}

const char* const kOpNames[KR_CPU_PHASE_OPS] = {"input_norm", "qkv",       "rope", "attention", "o",
                                                "post_norm",  "gate_up",   "silu", "down"};
const char* const kPartNames[3] = {"layers", "shallow", "adapter"};
const char* const kExtraNames[kKinds - kExtra] = {"head", "draft_head", "screen", "other"};

struct Names {
  char text[KR_CPU_PHASE_KINDS][40];
  Names() {
    for (int k = 0; k < kExtra; ++k) {
      const int part = k / (2 * KR_CPU_PHASE_OPS), many = (k / KR_CPU_PHASE_OPS) % 2, op = k % KR_CPU_PHASE_OPS;
      std::snprintf(text[k], sizeof text[k], "%s.%s%s", kPartNames[part], kOpNames[op], many ? "[n]" : "");
    }
    for (int k = kExtra; k < kKinds; ++k) std::snprintf(text[k], sizeof text[k], "%s", kExtraNames[k - kExtra]);
  }
};

}  // namespace

void record(int kind, int64_t body_ns, int64_t wait_ns) {
  if (kind < 0 || kind >= kKinds) kind = kOther;
  std::atomic<int64_t>* v = g_slots[my_slot()].v + kind * kFields;
  v[0].fetch_add(body_ns, std::memory_order_relaxed);
  v[1].fetch_add(wait_ns, std::memory_order_relaxed);
  v[2].fetch_add(1, std::memory_order_relaxed);
}

}  // namespace kr_cpu::phase_stats

using namespace kr_cpu::phase_stats;

extern "C" int kr_cpu_phase_stats_enable(int on) { return g_on.exchange(on != 0 ? 1 : 0); }

extern "C" void kr_cpu_phase_stats_reset(void) {
  for (Slot& s : g_slots)
    for (std::atomic<int64_t>& x : s.v) x.store(0, std::memory_order_relaxed);
}

extern "C" const char* kr_cpu_phase_kind_name(int kind) {
  static const Names names;
  return kind >= 0 && kind < kKinds ? names.text[kind] : "";
}

extern "C" void kr_cpu_phase_stats_read(int64_t* out) {
  for (int i = 0; i < KR_CPU_PHASE_KINDS * kFields; ++i) {
    int64_t total = 0;
    for (const Slot& s : g_slots) total += s.v[i].load(std::memory_order_relaxed);
    out[i] = total;
  }
}
