"""Attention kernels behind `moss_jax.attention.attention` (design and numbers: docs/kernels.md).

common      masks, online-softmax steps, block sizes, compiled-vs-interpreted dispatch
blockwise   memory-efficient XLA attention with a custom VJP (the CPU path of "auto")
flash_tpu   Pallas/Mosaic flash attention, forward and backward
flash_gpu   Pallas/Triton flash attention, forward and backward
decode_tpu  Pallas/Mosaic one-query-per-row attention over a KV cache
decode_gpu  Pallas/Triton one-query-per-row attention over a KV cache
partition   shard_map wrapper that runs a kernel per device on a mesh

int8_cpu    not attention: the few-row int8 x int8 -> int32 dot of W8A8 decoding on CPU (XLA FFI,
            C++ in int8_cpu.cc), used by moss_jax.quant
"""
