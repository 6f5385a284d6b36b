// The launch plans of csrc/include/launch_plan.h behind a C interface, for
// `python -m vtattn.check_launches` (python/vtattn/check_launches.py compiles this file with the
// host compiler and calls it through ctypes). Not part of vtattn._C.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "launch_plan.h"

namespace {

using vtattn::plan::Plan;

std::string quoted(const char* s) {
  std::string out = "\"";
  for (; *s; ++s) {
    if (*s == '"' || *s == '\\') out += '\\';
    out += *s;
  }
  return out + '"';
}

std::string to_json(const Plan& p, const std::string& extra = "") {
  std::string out = "{\"error\": " + (p.ok() ? std::string("null") : quoted(p.error)) + ", \"launches\": [";
  for (int i = 0; i < p.n; ++i) {
    const auto& l = p.launch[i];
    char buf[256];
    std::snprintf(buf, sizeof(buf), "%s{\"kernel\": \"%s\", \"grid\": [%lld, %lld, %lld], \"block\": %lld, "
                  "\"dyn_smem\": %lld, \"opt_in\": %s}", i ? ", " : "", l.kernel, (long long)l.grid[0],
                  (long long)l.grid[1], (long long)l.grid[2], (long long)l.block, (long long)l.dyn_smem,
                  l.opt_in ? "true" : "false");
    out += buf;
  }
  return out + "]" + extra + "}";
}

std::string plan_json(const std::string& op, const int64_t* a, int n, const vtattn::plan::Device& d) {
  namespace plan = vtattn::plan;
  auto need = [&](int k) { return n == k; };
  if (op == "select_tokens" && need(3)) return to_json(plan::select_tokens(d, a[0], a[1], a[2]));
  if (op == "gather_tokens" && need(2)) return to_json(plan::gather_tokens(a[0], a[1]));
  if (op == "paged_append" && need(2)) return to_json(plan::paged_append(a[0], a[1]));
  if (op == "merge_tokens" && need(4)) return to_json(plan::merge_tokens(a[0], a[1], a[2], a[3]));
  if (op == "decode_attention" && need(5)) {
    const auto p = plan::decode_attention(d, a[0], a[1], a[2], a[3], a[4]);
    return to_json(p, ", \"chunk\": " + std::to_string(p.chunk) + ", \"splits\": " + std::to_string(p.splits));
  }
  if (op == "flash" && need(7)) return to_json(plan::flash(d, a[0], a[1], a[2], a[3], a[4], a[5] != 0, a[6]));
  if (op == "block_sparse_attention" && need(7))
    return to_json(plan::block_sparse_attention(d, a[0], a[1], a[2], a[3], a[4], a[5], a[6]));
  if (op == "key_importance" && need(7))
    return to_json(plan::key_importance(d, a[0], a[1], a[2], a[3], a[4], a[5], a[6] != 0));
  if (op == "select_max_segment" && need(0))
    return "{\"error\": null, \"launches\": [], \"value\": " + std::to_string(plan::select_max_segment(d)) + "}";
  if (op == "constants" && need(0))
    return "{\"error\": null, \"launches\": [], \"default_smem\": " + std::to_string(plan::kDefaultSmem) +
           ", \"max_grid_x\": " + std::to_string(plan::kMaxGridX) + ", \"max_grid_yz\": " +
           std::to_string(plan::kMaxGridYZ) + ", \"static_smem_bounds\": {\"select_kernel\": " +
           std::to_string(plan::kSelectStaticSmem) + "}}";
  return "";
}

}  // namespace

// Writes the plan of `op` for arguments a[0..n) on a device with `smem_optin` bytes of opt-in shared
// memory per block and `sms` SMs as JSON into out; returns its length, -1 for an unknown op or
// argument count, -2 when out is too small.
extern "C" int vtattn_launch_plan(const char* op, const int64_t* a, int n, int64_t smem_optin, int64_t sms, char* out,
                                  int out_len) {
  const std::string json = plan_json(op, a, n, vtattn::plan::Device{smem_optin, sms});
  if (json.empty()) return -1;
  if (static_cast<int>(json.size()) >= out_len) return -2;
  std::memcpy(out, json.c_str(), json.size() + 1);
  return static_cast<int>(json.size());
}
