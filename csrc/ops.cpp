// The one list of vtattn._C op schemas. CPU kernels register in csrc/cpu/,
// CUDA kernels in csrc/cuda/; the Python registry (vtattn._registry) wraps
// these in the public torch.ops.vtattn ops with fake impls and dispatch.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

TORCH_LIBRARY(vtattn_C, m) {
  // Flash-style forward: out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] fp32.
  // GQA (Hq % Hkv == 0); causal masks are aligned to the end (key j is visible
  // to row i when j <= i + Nk - Nq); window w >= 0 also hides keys j < i + Nk - Nq - w
  // (-1 = none); softcap c > 0 maps logits s to c tanh(s / c) (0 = off); sinks fp32 [Hq]
  // (contiguous, q's device) add exp(sink_h) to every row's denominator. Rows that see no
  // key give out 0, lse -inf (the sink with sinks).
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, float softcap, int window, "
        "Tensor? sinks) -> (Tensor, Tensor)");
  // Sum over the chosen query rows of attention's probabilities (same options) -> fp32 [B, Hq, Nk].
  // rows: int64 [B, R] of row indices, -1 entries skipped; None = every row.
  // lse: fp32 [B, Hq, Nq] of the rows' log-sum-exp; None = computed here.
  m.def("key_importance(Tensor q, Tensor k, Tensor? lse, Tensor? rows, bool causal, float scale, float softcap, "
        "int window, Tensor? sinks) -> Tensor");
  // Segmented top-k of scores [B, N] -> (indices int64 [B, max_keep], mask bool [B, N], counts int64 [B]).
  // budgets: int64 [B, S] kept per (sample, segment), clamped to the segment; segments: S lengths
  // summing to N. Ties to the lower index; indices ascending (sort) or per segment by descending
  // score; -1 past counts[b].
  m.def("select_tokens(Tensor scores, Tensor budgets, int[] segments, int max_keep, bool sort) -> (Tensor, Tensor, Tensor)");
  // x [B, N, C] rows at indices [B, K] (outside [0, N): zero rows) -> [B, K, C]; with cu_seqlens
  // [B + 1] the first cu_seqlens[b+1] - cu_seqlens[b] rows of sample b packed into [total, C].
  m.def("gather_tokens(Tensor x, Tensor indices, Tensor? cu_seqlens, int total) -> Tensor");
  // Kept rows of x (indices [B, K]) with every pruned token (mask False) folded into the kept
  // token of highest key cosine: (x_c + sum w_i x_i) / (1 + sum w_i), w = 1 or max(cos, 0).
  m.def("merge_tokens(Tensor x, Tensor keys, Tensor indices, Tensor mask, bool weighted) -> Tensor");
  // Packed q [Tq, Hq, D], k/v [Tk, Hkv, D]; sequence b spans cu_seqlens_*[b]..[b+1] (int32 [B + 1]).
  // -> out [Tq, Hq, D] contiguous, lse fp32 [Hq, Tq]; causal end-aligned per sequence; max_seqlen_q
  // (>= the longest query sequence) sizes the launch; softcap, window, sinks as attention's.
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
        "bool causal, float scale, float softcap, int window, Tensor? sinks) -> (Tensor, Tensor)");
  // Attention of q [B, Hq, Nq, D] over the keys kv_indices int64 [B, Hkv, L] (first kv_counts int32
  // [B, Hkv] entries) of k/v [B, Hkv, Nk, D]; causal: visible iff kv_positions[b, j] <= q_positions[b, i]
  // (int64 [B, Nk], [B, Nq]). -> out [B, Hq, Nq, D] over [B, Nq, Hq, D] memory; no visible key: 0.
  m.def("index_attention(Tensor q, Tensor k, Tensor v, Tensor kv_indices, Tensor kv_counts, Tensor q_positions, Tensor kv_positions, bool causal, float scale) -> Tensor");
  // One decode step: q [B, Hq, 1, D] over k_cache/v_cache [B, Hkv, L_cap, D] of which each (batch,
  // kv head) uses the first lengths[b, g] keys (int32 [B, Hkv], in [0, L_cap]; 0 gives zeros) -> [B, Hq, 1, D].
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor");
  // Attention where query block m (block_size rows) sees only key blocks kv_indices[b, h, m, :kv_num_blocks[b, h, m]]
  // (FlexAttention's BlockMask layout: int32 [B or 1, Hq or 1, Q_blocks(, K_blocks)]); causal also masks
  // element by element (end-aligned). -> out [B, Hq, Nq, D] over [B, Nq, Hq, D] memory, lse fp32 [B, Hq, Nq].
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, int block_size, "
        "bool causal, float scale) -> (Tensor, Tensor)");
  // decode_attention over a paged cache: k_pages/v_pages [num_pages, page_size, D], block_table int32
  // [B, Hkv, max_pages]; token t of (b, g) is k_pages[block_table[b, g, t / page_size], t % page_size].
  m.def("paged_decode_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor lengths, "
        "float scale) -> Tensor");
  // A decode step's k, v [B, H, n, D] appended in place to a paged cache (kv.pages.Pages): token t of
  // head (b, h) goes to flat slot s = next_slot[b, h] + t (int64 [B, H]; row s % page_size of page
  // s / page_size of the [P, page_size, D] pools), clamped to last[b, h] when given (tokens clamped
  // there all write the newest one); pos[s] = start + t (int64 [P, page_size]; start an int64 0-dim
  // tensor on the pools' device or the CPU), score[s] = 0 (fp32 [P, page_size]); then next_slot and
  // lengths (int32 [B, H]) grow by n.
  m.def("paged_append(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos, Tensor(d!) next_slot, "
        "Tensor(e!) lengths, Tensor k, Tensor v, Tensor start, Tensor? last, Tensor(f!)? score) -> ()");
  // A compressed layer's decode step: paged_append(k_pages, ..., score), then
  // paged_decode_attention(q, k_pages, v_pages, block_table, lengths, scale) -> [B, Hq, 1, D].
  m.def("paged_decode_step(Tensor q, Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos, Tensor(d!) next_slot, "
        "Tensor(e!) lengths, Tensor k, Tensor v, Tensor start, Tensor? last, Tensor(f!)? score, Tensor block_table, "
        "float scale) -> Tensor");
  // Decode-time H2O eviction in place (kv.decode.evict): head (b, h)'s token t is flat slot head_start[b, h] + t
  // of the [P, page_size] pools (k/v [P, page_size, D], pos int64, score fp32), t < lengths[b, h];
  // head_start, lengths, keep: CPU int64 [B, H]. Each token's score grows by the GQA-mean attention mass
  // of queries [B, G * H, n, D] (query i at position start + i sees pos <= start + i; logits scale * q.k);
  // then each head keeps keep[b, h] tokens, dropping the lowest-scored (ties: the older) among its first
  // lengths - recent, moves them (k, v, pos, score) to the front of its run in order and sets pos = -1 on
  // slots [keep, lengths); then, where given, the pools' counts follow: counts = keep (int32 [B, H]) and
  // next_slot = head_start + keep (int64 [B, H]), on the pools' device.
  m.def("paged_evict(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos, Tensor(d!) score, Tensor queries, "
        "Tensor head_start, Tensor lengths, Tensor keep, int start, int recent, float scale, "
        "Tensor(e!)? counts=None, Tensor(f!)? next_slot=None) -> ()");
  // DecodeH2O's decode step on a static cache (kv.decode.StaticEviction), on device counts: head (b, h) owns
  // capacity[b, h] <= width slots from head_start[b, h] of the pools (as paged_evict's) and holds its first
  // lengths[b, h] (int32) <= floor[b, h] + every, this step's token included. Each token's score grows by the GQA-mean attention
  // mass of q [B, G * H, 1, D]; since (int64, one element) grows by one, and on reaching `every` returns to 0
  // while each head drops its max(lengths - floor, 0) lowest-scored tokens (ties: the lower position) outside
  // its `recent` newest positions, refilling the freed slots below the new length from its tail (k, v, pos,
  // score) and setting pos = -1 past it; lengths and next_slot = head_start + lengths follow.
  m.def("paged_evict_step(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) pos, Tensor(d!) score, Tensor q, "
        "Tensor head_start, Tensor capacity, Tensor floor, Tensor(e!) lengths, Tensor(f!) next_slot, "
        "Tensor(g!) since, int every, int recent, int width, float scale) -> ()");
  // Attention split by key group (VAR): groups int64 [B, Nk] (-1: no row sees the key); the softmax over
  // every key a row sees (causal: j <= i + Nk - Nq), then out [B, Hq, Nq, G, D] (token-major memory) and
  // mass [B, Hq, Nq, G], fp32, each group's share of the row's probability-weighted values and mass.
  m.def("group_attention(Tensor q, Tensor k, Tensor v, Tensor groups, int num_groups, bool causal, float scale) "
        "-> (Tensor, Tensor)");
  // CMAI's pass 2 for the last R = q.size(2) of T text entries (patch.cmai; the spec:
  // vtattn/reference/cmai_step.py): q [B, Hq, R, D]; the record's text entries k_t / v_t [B, Hkv, T, D],
  // text (int64 positions) / text_ok (bool) [B, T], its image entries k_i / v_i [B, Hkv, I, D], image /
  // image_ok [B, I], and p_ti [B, Hq, T, I] fp32, each entry's probabilities on the image keys (the R last
  // rows written). Returns the rows' inhibited attention, fp32 [B, Hq, R, D].
  m.def("cmai_step(Tensor q, Tensor k_t, Tensor v_t, Tensor text, Tensor text_ok, Tensor k_i, Tensor v_i, "
        "Tensor image, Tensor image_ok, Tensor(a!) p_ti, float keep, float weight, float scale) -> Tensor");
  // The instruction set of the C++ CPU kernels' tile operations in this process: "avx512", "avx2" or
  // "baseline" (the best the CPU runs, capped by VTATTN_CPU_ISA at the first call). Not a tensor op.
  m.def("cpu_tile_level() -> str");
}

namespace {

// paged_decode_step on every device: the two ops' own kernels, called through the dispatcher from
// C++ (one Python-to-dispatcher crossing instead of two: that crossing, not the kernels, is most of
// a small decode step's host time).
at::Tensor paged_decode_step(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                             const at::Tensor& pos, const at::Tensor& next_slot, const at::Tensor& lengths,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& start,
                             const std::optional<at::Tensor>& last, const std::optional<at::Tensor>& score,
                             const at::Tensor& block_table, double scale) {
  static const auto append =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vtattn_C::paged_append", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&)>();
  static const auto decode = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("vtattn_C::paged_decode_attention", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, double)>();
  append.call(k_pages, v_pages, pos, next_slot, lengths, k, v, start, last, score);
  return decode.call(q, k_pages, v_pages, block_table, lengths, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(vtattn_C, CompositeExplicitAutograd, m) { m.impl("paged_decode_step", &paged_decode_step); }

// Importing vtattn._C loads the library and so registers the ops above.
static struct PyModuleDef vtattn_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vtattn_c_module); }
