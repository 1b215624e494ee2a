// VALID, stride-1 3D convolution on the CPU through oneDNN, as three XLA FFI handlers (jule3d/onednn.py).
//
// Layouts are JAX's: activations NDHWC, kernels DHWIO (the flax.linen.Conv layout), float32. oneDNN
// reads and writes the activations in place (format tag ndhwc); the kernel is reordered into the
// blocked layout the chosen implementation prefers (format_tag::any), and the weight gradient is
// reordered back. Primitives are built once per shape and kept (one mutex-guarded cache); the
// reductions of oneDNN's CPU kernels are fixed for a fixed thread count, so results repeat run to run.
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Shape {
  int64_t n, d, h, w, c, k, f;  // batch, input depth/height/width/channels, kernel edge, out channels
  auto key() const { return std::make_tuple(n, d, h, w, c, k, f); }
  memory::dims src() const { return {n, c, d, h, w}; }
  memory::dims wei() const { return {f, c, k, k, k}; }
  memory::dims dst() const { return {n, f, d - k + 1, h - k + 1, w - k + 1}; }
};

struct Primitives {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_wei_pd;
  dnnl::convolution_backward_weights bwd_wei;
  dnnl::reorder wei_to_fwd, wei_to_bwd_data, diff_wei_from_bwd;
};

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

std::mutex mu;
std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>,
         std::unique_ptr<Primitives>>
    cache;

Primitives& Get(const Shape& s) {
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[s.key()];
  if (!slot) {
    auto& eng = Engine();
    memory::desc src(s.src(), dt::f32, tag::ndhwc), dst(s.dst(), dt::f32, tag::ndhwc);
    memory::desc wei_any(s.wei(), dt::f32, tag::any), wei_user(s.wei(), dt::f32, tag::dhwio);
    memory::dims one = {1, 1, 1}, zero = {0, 0, 0};
    auto alg = dnnl::algorithm::convolution_direct;
    // XLA may run independent custom calls at the same time on its own threads: every call gets
    // its own scratchpad (the library-managed one is shared by the primitives).
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    auto fwd_pd = dnnl::convolution_forward::primitive_desc(
        eng, dnnl::prop_kind::forward_training, alg, src, wei_any, dst, one, zero, zero, attr);
    auto bd_pd = dnnl::convolution_backward_data::primitive_desc(eng, alg, src, wei_any, dst, one,
                                                                 zero, zero, fwd_pd, attr);
    auto bw_pd = dnnl::convolution_backward_weights::primitive_desc(eng, alg, src, wei_any, dst,
                                                                    one, zero, zero, fwd_pd, attr);
    slot.reset(new Primitives{
        fwd_pd, dnnl::convolution_forward(fwd_pd), bd_pd, dnnl::convolution_backward_data(bd_pd),
        bw_pd, dnnl::convolution_backward_weights(bw_pd),
        dnnl::reorder(dnnl::reorder::primitive_desc(eng, wei_user, eng, fwd_pd.weights_desc())),
        dnnl::reorder(dnnl::reorder::primitive_desc(eng, wei_user, eng, bd_pd.weights_desc())),
        dnnl::reorder(
            dnnl::reorder::primitive_desc(eng, bw_pd.diff_weights_desc(), eng, wei_user))});
  }
  return *slot;
}

// The call's shape from x [N,D,H,W,C] and the kernel [k,k,k,C,F], or why they do not fit.
ffi::Error ShapeOf(const ffi::Span<const int64_t>& x, const ffi::Span<const int64_t>& w, Shape* s) {
  if (x.size() != 5 || w.size() != 5 || w[0] != w[1] || w[0] != w[2] || x[4] != w[3] ||
      x[1] < w[0] || x[2] < w[0] || x[3] < w[0])
    return ffi::Error::InvalidArgument("onednn conv3d: expected x [N,D,H,W,C], kernel [k,k,k,C,F]");
  *s = Shape{x[0], x[1], x[2], x[3], x[4], w[0], w[4]};
  return ffi::Error::Success();
}

// The kernel (DHWIO) in the layout primitive `want` reads: reordered into scratch when it differs.
memory KernelFor(const Shape& s, float* data, const memory::desc& want, dnnl::reorder& r,
                 dnnl::stream& st) {
  auto& eng = Engine();
  memory user(memory::desc(s.wei(), dt::f32, tag::dhwio), eng, data);
  if (want == user.get_desc()) return user;
  memory out(want, eng);
  r.execute(st, user, out);
  return out;
}

dnnl::stream& Stream() {
  static thread_local dnnl::stream st(Engine());
  return st;
}

// Runs one primitive on `args` plus a scratchpad of its own (see Get), and waits for it: the
// scratchpad and a reordered kernel live only as long as `args`.
template <typename PrimitiveDesc>
void Execute(const dnnl::primitive& prim, const PrimitiveDesc& pd,
             std::unordered_map<int, memory> args, dnnl::stream& st) {
  args.insert({DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), Engine())});
  prim.execute(st, args);
  st.wait();
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  Shape s{};
  if (auto e = ShapeOf(x.dimensions(), w.dimensions(), &s); e.failure()) return e;
  auto& p = Get(s);
  auto& eng = Engine();
  auto& st = Stream();
  Execute(p.fwd, p.fwd_pd,
          {{DNNL_ARG_SRC, memory(p.fwd_pd.src_desc(), eng, x.typed_data())},
           {DNNL_ARG_WEIGHTS,
            KernelFor(s, w.typed_data(), p.fwd_pd.weights_desc(), p.wei_to_fwd, st)},
           {DNNL_ARG_DST, memory(p.fwd_pd.dst_desc(), eng, y->typed_data())}},
          st);
  return ffi::Error::Success();
}

// dx from dy and the kernel; x's shape comes from the result buffer.
ffi::Error BwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> dx) {
  Shape s{};
  if (auto e = ShapeOf(dx->dimensions(), w.dimensions(), &s); e.failure()) return e;
  auto& p = Get(s);
  auto& eng = Engine();
  auto& st = Stream();
  const auto& pd = p.bwd_data_pd;
  Execute(p.bwd_data, pd,
          {{DNNL_ARG_DIFF_DST, memory(pd.diff_dst_desc(), eng, dy.typed_data())},
           {DNNL_ARG_WEIGHTS,
            KernelFor(s, w.typed_data(), pd.weights_desc(), p.wei_to_bwd_data, st)},
           {DNNL_ARG_DIFF_SRC, memory(pd.diff_src_desc(), eng, dx->typed_data())}},
          st);
  return ffi::Error::Success();
}

// dkernel from x and dy.
ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw) {
  Shape s{};
  if (auto e = ShapeOf(x.dimensions(), dw->dimensions(), &s); e.failure()) return e;
  auto& p = Get(s);
  auto& eng = Engine();
  auto& st = Stream();
  const auto& pd = p.bwd_wei_pd;
  memory user(memory::desc(s.wei(), dt::f32, tag::dhwio), eng, dw->typed_data());
  bool direct = pd.diff_weights_desc() == user.get_desc();
  memory diff_wei = direct ? user : memory(pd.diff_weights_desc(), eng);
  Execute(p.bwd_wei, pd,
          {{DNNL_ARG_SRC, memory(pd.src_desc(), eng, x.typed_data())},
           {DNNL_ARG_DIFF_DST, memory(pd.diff_dst_desc(), eng, dy.typed_data())},
           {DNNL_ARG_DIFF_WEIGHTS, diff_wei}},
          st);
  if (!direct) {
    p.diff_wei_from_bwd.execute(st, diff_wei, user);
    st.wait();
  }
  return ffi::Error::Success();
}

// The name of the implementation oneDNN chose for each pass (for the benchmark's table).
std::string impl_info;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Jule3dConvFwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Jule3dConvBwdData, BwdData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Jule3dConvBwdWeights, BwdWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// "fwd|bwd_data|bwd_weights" implementation names for a shape (C ABI, for ctypes).
extern "C" const char* Jule3dConvImpl(int64_t n, int64_t d, int64_t h, int64_t w, int64_t c,
                                      int64_t k, int64_t f) {
  auto& p = Get(Shape{n, d, h, w, c, k, f});
  impl_info = std::string(p.fwd_pd.impl_info_str()) + "|" + p.bwd_data_pd.impl_info_str() + "|" +
              p.bwd_wei_pd.impl_info_str();
  return impl_info.c_str();
}
