"""The native decode step over a loaded model: its weights packed once, then one C++ call a step.

`NativeDecoder.create(model)` returns a decoder, or the reason the model cannot take this path
(then the caller keeps the torch step and logs why). `decoder(input_ids, kv_cache, meta)` is
`MixtralModel.forward` for a batch of single-token decodes: the final norm's output [S, D].

Shape legend: S sequences, D hidden, N, K a linear layer's output and input sizes.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_float, c_int32, c_int64, c_void_p

import torch
from torch import nn

from model.batch import AttentionMetadata
from model.mixtral import MixtralModel
from model.native.build import NativeLibrary, load_native
from model.native.linear import DTYPE_CODES, LinearDesc, NativeLinear
from model.quant import QuantLinear

# The C++ side's fixed-size scratch: query heads per kv head, experts, top-k.
_MAX_GROUP, _MAX_EXPERTS, _MAX_TOP_K = 64, 256, 64


class _LayerWeights(ctypes.Structure):
    _fields_ = [
        ("qkv", LinearDesc),
        ("o", LinearDesc),
        ("router", c_void_p),
        ("input_norm", c_void_p),
        ("post_norm", c_void_p),
        ("w13", POINTER(LinearDesc)),
        ("w2", POINTER(LinearDesc)),
    ]


class _ModelDesc(ctypes.Structure):
    _fields_ = [
        *((name, c_int64) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim")),
        *((name, c_int64) for name in ("ffn", "num_experts", "top_k")),
        ("eps", c_float),
        ("attn_scale", c_float),
        ("dtype", c_int32),
        ("threads", c_int32),
        ("layers", POINTER(_LayerWeights)),
        ("final_norm", c_void_p),
        ("embed", c_void_p),
        ("rope", c_void_p),
    ]


class _StepDesc(ctypes.Structure):
    _fields_ = [
        ("num_seqs", c_int64),
        ("input_ids", c_void_p),
        ("positions", c_void_p),
        ("slots", c_void_p),
        ("block_tables", c_void_p),
        ("bt_stride", c_int64),
        ("seq_lens", c_void_p),
        ("kv", c_void_p),
        ("num_blocks", c_int64),
        ("block_size", c_int64),
        ("out", c_void_p),
    ]


def unsupported_reason(model: MixtralModel, lib: NativeLibrary) -> str | None:
    """Why `model` cannot run the native step, or None."""
    config = model.config
    dtype = model.embed_tokens.weight.dtype
    if model.embed_tokens.weight.device.type != "cpu":
        return "the model is not on the CPU"
    if model.parallel.size != 1:
        return "tensor or expert parallel (the native step is one rank's)"
    if model.kernels.name != "torch":
        return f"the {model.kernels.name} kernels are in use"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{dtype} weights (bfloat16 and float32 only)"
    kinds: set[torch.dtype] = set()  # the C side takes every layer's GEMM input type from one
    for layer in model.layers:
        linears = [layer.attn.qkv_proj, layer.attn.o_proj]
        if not all(isinstance(m, nn.Linear | QuantLinear) for m in linears) or layer.ffn.w13.numel() == 0:
            return "prepacked weights (one decoder per model, created before pack_for_cpu)"
        kinds |= {m.weight.dtype for m in linears} | {layer.ffn.w13.dtype, layer.ffn.w2.dtype}
        shapes = [m.weight.shape for m in linears] + [layer.ffn.w13.shape[1:], layer.ffn.w2.shape[1:]]
        odd = [tuple(s) for s in shapes if s[0] % 16 or s[1] % 16]
        if odd:
            return f"a linear layer's sizes {odd[0]} are not multiples of 16"
    if kinds not in ({dtype}, {torch.int8}):
        named = ", ".join(sorted(str(k) for k in kinds))
        return f"{named} linear weights (bf16, fp32 or int8 throughout)"
    if torch.bfloat16 in kinds and not lib.has_bf16:
        return "this CPU lacks AVX512-BF16, which bfloat16 weights need"
    if config.head_dim % 16:
        return f"head_dim {config.head_dim} is not a multiple of 16"
    if config.num_heads // config.num_kv_heads > _MAX_GROUP:
        return f"more than {_MAX_GROUP} query heads per kv head"
    moe = config.moe
    if moe is not None and (moe.num_experts > _MAX_EXPERTS or moe.top_k > _MAX_TOP_K):
        return f"more than {_MAX_EXPERTS} experts or a top-k over {_MAX_TOP_K}"
    return None


class NativeDecoder:
    """The packed weights and the descriptors the C++ step reads; the tensors are kept alive here."""

    def __init__(self, model: MixtralModel, lib: NativeLibrary, threads: int) -> None:
        config = model.config
        dtype = model.embed_tokens.weight.dtype
        self._fn = lib.dll.mixtral_decode_step
        self._fn.argtypes = [POINTER(_ModelDesc), POINTER(_StepDesc)]
        self._fn.restype = c_int32
        self._keep: list[object] = []  # every tensor and ctypes array a pointer refers to
        self.dtype = dtype

        layers = (_LayerWeights * config.num_layers)()
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                attn, ffn = layer.attn, layer.ffn
                # The torch path runs on the same packed weights: the model holds each one once.
                attn.qkv_proj = _native(attn.qkv_proj, lib, threads)
                attn.o_proj = _native(attn.o_proj, lib, threads)
                w13s, w2s = ffn.w13_scale, ffn.w2_scale  # None unless int8
                experts = tuple(
                    (
                        NativeLinear(ffn.w13[e], lib, threads, None if w13s is None else w13s[e]),
                        NativeLinear(ffn.w2[e], lib, threads, None if w2s is None else w2s[e]),
                    )
                    for e in range(ffn.num_experts)
                )
                router = self._f32(ffn.gate.weight) if ffn.gate is not None else None
                ffn_size = ffn.w2.shape[2]
                ffn.use_packed(experts)
                w13 = (LinearDesc * len(experts))(*(w.desc for w, _ in experts))
                w2 = (LinearDesc * len(experts))(*(w.desc for _, w in experts))
                layers[i] = _LayerWeights(
                    attn.qkv_proj.desc,
                    attn.o_proj.desc,
                    router,
                    self._f32(layer.input_norm.weight),
                    self._f32(layer.post_attn_norm.weight),
                    w13,
                    w2,
                )
                self._keep += [attn.qkv_proj, attn.o_proj, experts, w13, w2]
        self._keep.append(layers)
        head = model.lm_head
        if isinstance(head, nn.Linear | QuantLinear) and head.out_features % 16 == 0:
            # Our GEMM streams a large matrix at one row faster than oneDNN's (34 against 26 GB/s
            # on the small checkpoint's 32 MB head, 2 cores); a tied head gets its own packed copy,
            # as oneDNN's packing would.
            model.lm_head = _native(head, lib, threads)
        moe = config.moe
        rope = self._keep_tensor(model.rotary.cos_sin.float().contiguous())
        embed = self._keep_tensor(model.embed_tokens.weight.detach())
        self._model = _ModelDesc(
            config.num_layers,
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            ffn_size,
            model.layers[0].ffn.num_experts,
            moe.top_k if moe is not None else 1,
            config.rms_norm_eps,
            config.head_dim**-0.5,
            DTYPE_CODES[dtype],
            threads,
            layers,
            self._f32(model.norm.weight),
            embed,
            rope,
        )
        self.hidden_size = config.hidden_size
        self.threads = threads
        self.max_positions = model.rotary.max_positions
        self.vocab_size = model.embed_tokens.weight.shape[0]

    @classmethod
    def create(cls, model: MixtralModel, threads: int | None = None) -> NativeDecoder | str:
        """A decoder for `model`, or why not. Call it on the loaded model before `pack_for_cpu`:
        it swaps the layers' attention projections and experts for `NativeLinear`s of its own
        packed weights (one-way), which `pack_for_cpu` then leaves as they are."""
        lib = load_native()
        if isinstance(lib, str):
            return lib
        reason = unsupported_reason(model, lib)
        if reason is not None:
            return reason
        return cls(model, lib, threads or torch.get_num_threads())

    def __call__(
        self, input_ids: torch.Tensor, kv_caches: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [S] -> [S, D]
        if meta.prefills or meta.num_decodes != meta.num_seqs:
            raise ValueError("the native step runs single-token decodes only")
        num_seqs = meta.num_seqs
        # The C++ side reads the embedding and the rotary table unchecked; the torch path would raise.
        if int(meta.seq_lens.max()) > self.max_positions:
            raise ValueError(f"a position past the rotary table's {self.max_positions}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size:
            raise IndexError(f"a token id outside the embedding's {self.vocab_size} rows")
        out = torch.empty(num_seqs, self.hidden_size, dtype=self.dtype)
        tables = meta.block_tables
        if tables.stride(1) != 1 or not all(
            t.is_contiguous() for t in (input_ids, meta.positions, meta.slot_mapping, meta.seq_lens)
        ):
            raise ValueError("the native step needs contiguous metadata rows")
        step = _StepDesc(
            num_seqs,
            input_ids.data_ptr(),
            meta.positions.data_ptr(),
            meta.slot_mapping.data_ptr(),
            tables.data_ptr(),
            tables.stride(0),
            meta.seq_lens.data_ptr(),
            kv_caches.data_ptr(),
            kv_caches.shape[2],
            kv_caches.shape[3],
            out.data_ptr(),
        )
        if self._fn(ctypes.byref(self._model), ctypes.byref(step)) != 0:
            raise RuntimeError("the native decode step does not run this dtype")
        return out

    def _keep_tensor(self, t: torch.Tensor) -> int:
        self._keep.append(t)
        return t.data_ptr()

    def _f32(self, t: torch.Tensor) -> int:
        return self._keep_tensor(t.detach().float().contiguous())


def _native(linear: nn.Module, lib: NativeLibrary, threads: int) -> NativeLinear:
    """An `nn.Linear` or an int8 `QuantLinear` as a `NativeLinear`."""
    scale = linear.scale if isinstance(linear, QuantLinear) else None
    return NativeLinear(linear.weight, lib, threads, scale)
