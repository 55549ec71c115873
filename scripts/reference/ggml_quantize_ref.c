// ggml's own reference quantizers (quantize_row_*_ref of ggml-quants.c), driven from the command line
// for scripts/reference/gguf_quantize.py: reads N little-endian f32 values from stdin and writes the
// blocks of TYPE (q4_K, q5_K, q6_K, q8_0, q4_0, q4_1, q5_0, q5_1) to stdout.
//
// Built without -march/-mfma, so no multiply-add is fused (the plain IEEE operations our Rust
// quantizers perform); ggml-quants.c links alone with the four stubs below:
//   gcc -O2 -std=gnu11 -I $GGML/include -I $GGML/src $GGML/src/ggml-quants.c ggml_quantize_ref.c -lm
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-quants.h"

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void) type; (void) ne; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void) type; return "?"; }
size_t ggml_type_size(enum ggml_type type) { (void) type; abort(); }

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TYPE N < f32 > blocks\n", argv[0]);
        return 2;
    }
    const char * ty = argv[1];
    const long n = atol(argv[2]);
    float * x = malloc(n * sizeof(float));
    if (fread(x, sizeof(float), n, stdin) != (size_t) n) {
        fprintf(stderr, "short input\n");
        return 1;
    }
    unsigned char * y = calloc(n * 2, 1);  // more than any of these types needs
    size_t bytes;
    if (!strcmp(ty, "q4_K")) { quantize_row_q4_K_ref(x, (void *) y, n); bytes = n / 256 * sizeof(block_q4_K); }
    else if (!strcmp(ty, "q5_K")) { quantize_row_q5_K_ref(x, (void *) y, n); bytes = n / 256 * sizeof(block_q5_K); }
    else if (!strcmp(ty, "q6_K")) { quantize_row_q6_K_ref(x, (void *) y, n); bytes = n / 256 * sizeof(block_q6_K); }
    else if (!strcmp(ty, "q8_0")) { quantize_row_q8_0_ref(x, (void *) y, n); bytes = n / 32 * sizeof(block_q8_0); }
    else if (!strcmp(ty, "q4_0")) { quantize_row_q4_0_ref(x, (void *) y, n); bytes = n / 32 * sizeof(block_q4_0); }
    else if (!strcmp(ty, "q4_1")) { quantize_row_q4_1_ref(x, (void *) y, n); bytes = n / 32 * sizeof(block_q4_1); }
    else if (!strcmp(ty, "q5_0")) { quantize_row_q5_0_ref(x, (void *) y, n); bytes = n / 32 * sizeof(block_q5_0); }
    else if (!strcmp(ty, "q5_1")) { quantize_row_q5_1_ref(x, (void *) y, n); bytes = n / 32 * sizeof(block_q5_1); }
    else { fprintf(stderr, "unknown type %s\n", ty); return 2; }
    fwrite(y, 1, bytes, stdout);
    return 0;
}
