//! f32 x bf16 matmul with the AVX512-BF16 dot-product instructions (detected at run time).
