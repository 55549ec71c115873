// llama.cpp's CPU matmuls (ggml's mul_mat: x quantized to 8 bits, integer dot products) on the shapes of
// examples/bench_ggml.rs, for the speed comparison (dev only). Links against the ggml of an installed
// llama-cpp-python (built for the native CPU):
//   L=$(python -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')/lib
//   G=<llama.cpp checkout>/ggml    # e.g. the llama-cpp-python sdist's vendor/llama.cpp/ggml
//   gcc -O2 -I $G/include bench/ggml_mul_mat.c -L $L -lggml -lggml-base -lggml-cpu -Wl,-rpath,$L -o /tmp/ggml_mul_mat
//   /tmp/ggml_mul_mat [threads]
// Part 1: one weight repeated (n = 1 and 79); part 2: a decoding step of SmolLM2-135M's Linears
// (30 layers x q, k, v, o, gate, up, down, distinct weights, plus the 49152 x 576 head as Q8_0) as one
// graph, as llama.cpp computes it (a persistent thread pool, one barrier per node).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml.h"
#include "ggml-cpu.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float * values(size_t n, unsigned seed, float scale) {
    float * v = malloc(n * sizeof(float));
    unsigned s = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13; s ^= s >> 17; s ^= s << 5;
        v[i] = ((float) s / 4294967295.0f - 0.5f) * scale;
    }
    return v;
}

static struct ggml_tensor * weight(struct ggml_context * ctx, enum ggml_type ty, int o, int k, unsigned seed) {
    struct ggml_tensor * w = ggml_new_tensor_2d(ctx, ty, k, o);
    float * f = values((size_t) o * k, seed, 0.1f);
    ggml_quantize_chunk(ty, f, w->data, 0, o, k, NULL);
    free(f);
    return w;
}

static struct ggml_threadpool * pool;
static int nth;

static double run(struct ggml_cgraph * gf, double budget) {
    struct ggml_cplan plan = ggml_graph_plan(gf, nth, pool);
    plan.work_data = malloc(plan.work_size + 64);
    ggml_graph_compute(gf, &plan);
    // the fastest of many short batches (about 3 ms each): batches slowed by other processes do not count
    double t0 = now();
    ggml_graph_compute(gf, &plan);
    double once = now() - t0;
    int reps = (int) (3e-3 / (once > 1e-7 ? once : 1e-7));
    if (reps < 1) reps = 1;
    double best = 1e30, start = now();
    while (now() - start < budget || best == 1e30) {
        t0 = now();
        for (int r = 0; r < reps; r++) ggml_graph_compute(gf, &plan);
        double t = (now() - t0) / reps;
        if (t < best) best = t;
    }
    free(plan.work_data);
    return best;
}

int main(int argc, char ** argv) {
    nth = argc > 1 ? atoi(argv[1]) : 2;
    ggml_cpu_init();
    struct ggml_threadpool_params tp = ggml_threadpool_params_default(nth);
    pool = ggml_threadpool_new(&tp);
    const enum ggml_type types[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K};
    const int shapes[][2] = {{576, 576}, {192, 576}, {1536, 576}, {576, 1536}, {49152, 576}};
    printf("threads: %d\n== part 1: one weight, repeated\n", nth);
    for (int s = 0; s < 5; s++) {
        int o = shapes[s][0], k = shapes[s][1];
        for (int ni = 0; ni < 2; ni++) {
            int n = ni ? 79 : 1;
            printf("[%d x %d] n=%d\n", o, k, n);
            for (int t = 0; t < 6; t++) {
                enum ggml_type ty = types[t];
                if (k % ggml_blck_size(ty)) continue;
                if (o == 49152 && ty != GGML_TYPE_Q8_0 && ty != GGML_TYPE_Q4_1) continue;
                struct ggml_init_params ip = {(size_t) o * k * 2 + ((size_t) 64 << 20), NULL, false};
                struct ggml_context * ctx = ggml_init(ip);
                struct ggml_tensor * w = weight(ctx, ty, o, k, 1);
                struct ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
                float * xv = values((size_t) k * n, 2 + n, 2.0f);
                memcpy(x->data, xv, (size_t) k * n * 4);
                free(xv);
                struct ggml_cgraph * gf = ggml_new_graph(ctx);
                ggml_build_forward_expand(gf, ggml_mul_mat(ctx, w, x));
                double sec = run(gf, 0.5);
                printf("  %-10s %9.1f us %7.1f GB/s %7.1f GFLOP/s\n", ggml_type_name(ty), sec * 1e6,
                       ggml_nbytes(w) / sec / 1e9, 2.0 * n * o * k / sec / 1e9);
                ggml_free(ctx);
            }
        }
    }
    printf("== part 2: a decoding step of SmolLM2-135M's Linears (30 layers, distinct weights, streamed)\n");
    const int layer[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
    const enum ggml_type lt[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q4_1, GGML_TYPE_Q4_0, GGML_TYPE_Q5_0};
    for (int t = 0; t < 4; t++) {
        struct ggml_init_params ip = {(size_t) 400 << 20, NULL, false};
        struct ggml_context * ctx = ggml_init(ip);
        struct ggml_tensor * x576 = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 576);
        struct ggml_tensor * x1536 = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 1536);
        float * a = values(576, 5, 2.0f), * b = values(1536, 6, 2.0f);
        memcpy(x576->data, a, 576 * 4);
        memcpy(x1536->data, b, 1536 * 4);
        struct ggml_cgraph * gf = ggml_new_graph_custom(ctx, 1024, false);
        size_t bytes = 0;
        for (int l = 0; l < 30; l++) {
            for (int i = 0; i < 7; i++) {
                struct ggml_tensor * w = weight(ctx, lt[t], layer[i][0], layer[i][1], l * 7 + i + 100);
                bytes += ggml_nbytes(w);
                ggml_build_forward_expand(gf, ggml_mul_mat(ctx, w, layer[i][1] == 576 ? x576 : x1536));
            }
        }
        struct ggml_tensor * head = weight(ctx, GGML_TYPE_Q8_0, 49152, 576, 9);
        bytes += ggml_nbytes(head);
        ggml_build_forward_expand(gf, ggml_mul_mat(ctx, head, x576));
        double sec = run(gf, 2.0);
        printf("  %-5s layers + Q8_0 head: %.2f ms/token (%.0f tokens/s), %.1f MB, %.1f GB/s\n", ggml_type_name(lt[t]),
               sec * 1e3, 1 / sec, bytes / 1e6, bytes / sec / 1e9);
        ggml_free(ctx);
    }
    ggml_threadpool_free(pool);
    return 0;
}
